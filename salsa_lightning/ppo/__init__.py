"""Stage 4: SALSA-PPO, PPO whose KL reference is a frozen model soup.

- ``settings``: the ``kl:`` and ``ppo:`` sections of the YAML;
- ``rollout``: the records one iteration builds (``Rollout`` -> scores -> ``Trajectory``);
- ``models``: the policy, references, reward model and critic, built in ``configure_model``;
- ``checks``: input checks run before any model is built;
- ``passes``: forward passes over rollout rows;
- ``estimators``: the advantage estimators, by name;
- ``losses``: the PPO loss of a micro-batch;
- ``update``: the update loop (epochs, minibatches, accumulation);
- ``metrics``, ``validation``, ``recipe``: logging, held-out evaluation, the frozen weights'
  recipe checked on resume;
- ``module``: ``SALSAModule``, the LightningModule that orchestrates them.
"""

from salsa_lightning.generation import GenerationSettings
from salsa_lightning.ppo.module import SALSAModule
from salsa_lightning.ppo.rollout import Rollout, Trajectory
from salsa_lightning.ppo.settings import KLSettings, PPOSettings

__all__ = [
    "GenerationSettings",
    "KLSettings",
    "PPOSettings",
    "Rollout",
    "SALSAModule",
    "Trajectory",
]
