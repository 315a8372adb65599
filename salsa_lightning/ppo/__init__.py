"""Stage 4: SALSA-PPO, PPO whose KL reference is a frozen model soup.

- ``module``: ``SALSAModule``, the LightningModule; one PPO iteration is its ``training_step``,
  read top to bottom in that file;
- ``rollout``: the records one iteration hands on (``Rollout`` -> scores -> ``Trajectory``)
  and the metrics a trajectory is logged with;
- ``estimators``: the advantage estimators, by name;
- ``settings``: the ``estimator:``, ``kl:``, ``ppo:`` and ``reward:`` sections of the YAML;
- ``models``: building the policy, references, reward model and critic (``configure_model``);
- ``checks``: input checks run before any model is built;
- ``validation``: what validation records per held-out answer;
- ``recipe``: the frozen weights' recipe, checked on resume.
"""

from salsa_lightning.generation import GenerationSettings
from salsa_lightning.ppo.module import SALSAModule
from salsa_lightning.ppo.rollout import Rollout, Trajectory
from salsa_lightning.ppo.settings import (
    EstimatorSettings,
    KLSettings,
    PPOSettings,
    RewardSettings,
)

__all__ = [
    "EstimatorSettings",
    "GenerationSettings",
    "KLSettings",
    "PPOSettings",
    "RewardSettings",
    "Rollout",
    "SALSAModule",
    "Trajectory",
]
