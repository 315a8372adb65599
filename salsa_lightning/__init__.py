"""SALSA: soup-based alignment learning as PyTorch Lightning modules.

The pipeline, in the order a run takes: ``data`` (DataModules) -> ``sft`` (SFTModule) ->
``reward`` (RewardModule) -> ``soup`` (model soups) -> ``ppo`` (SALSAModule: PPO or a group
estimator with a soup reference; ``dpo``: DPOModule, offline preference optimisation with a soup
reference) -> ``evaluate`` and ``report``. ``task`` is the embedded default task, ``functional``
holds the math and ``cli`` the ``salsa`` command (``docs/layout.md`` names every file).
"""

__version__ = "0.1.0"

from salsa_lightning.data import PreferenceDataModule, PromptDataModule, SFTDataModule
from salsa_lightning.dpo import DPOModule
from salsa_lightning.errors import SalsaError
from salsa_lightning.ppo import SALSAModule
from salsa_lightning.reward import RewardModule
from salsa_lightning.sft import SFTModule

__all__ = [
    "DPOModule",
    "PreferenceDataModule",
    "PromptDataModule",
    "RewardModule",
    "SALSAModule",
    "SFTDataModule",
    "SFTModule",
    "SalsaError",
]
