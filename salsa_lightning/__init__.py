"""SALSA: soup-based alignment learning as PyTorch Lightning modules.

The pipeline, in the order a run takes: ``data`` (DataModules) -> ``sft`` (SFTModule) ->
``reward`` (RewardModule) -> ``soup`` (model soups) -> ``salsa`` (SALSAModule, PPO with a soup
reference). ``task`` is the embedded default task and ``functional`` holds the math.
"""

__version__ = "0.1.0"

from salsa_lightning.data import PreferenceDataModule, PromptDataModule, SFTDataModule
from salsa_lightning.errors import SalsaError
from salsa_lightning.ppo import SALSAModule
from salsa_lightning.reward import RewardModule
from salsa_lightning.sft import SFTModule

__all__ = [
    "PreferenceDataModule",
    "PromptDataModule",
    "RewardModule",
    "SALSAModule",
    "SFTDataModule",
    "SFTModule",
    "SalsaError",
]
