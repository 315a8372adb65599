"""Stage 4: SALSA-PPO, PPO whose KL reference is a model soup, frozen or moving.

- ``module``: ``SALSAModule``, the LightningModule; one PPO iteration is its ``training_step``,
  read top to bottom in that file;
- ``rollout``: the records one iteration hands on (``Rollout`` -> scores -> ``Trajectory``)
  and the metrics a trajectory is logged with;
- ``estimators``: the advantage estimators, by name;
- ``settings``: the ``estimator:``, ``kl:``, ``ppo:``, ``reward:`` and ``reference_update:``
  sections of the YAML;
- ``moving``: a moving reference (an EMA of the policy): which tensors move toward which;
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
    ReferenceUpdate,
    RewardSettings,
)

__all__ = [
    "EstimatorSettings",
    "GenerationSettings",
    "KLSettings",
    "PPOSettings",
    "ReferenceUpdate",
    "RewardSettings",
    "Rollout",
    "SALSAModule",
    "Trajectory",
]
