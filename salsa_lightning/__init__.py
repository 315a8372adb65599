"""SALSA: soup-based alignment learning as PyTorch Lightning modules.

The pipeline, in the order a run takes: ``data`` (DataModules) -> ``sft`` (SFTModule) ->
``reward`` (RewardModule) -> ``soup`` (model soups) -> ``ppo`` (SALSAModule: PPO or a group
estimator with a soup reference; ``dpo``: DPOModule, offline preference optimisation with a soup
reference) -> ``evaluate`` and ``report``. ``task`` is the embedded default task, ``functional``
holds the math and ``cli`` the ``salsa`` command (``docs/layout.md`` names every file).
"""

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING

# Each class is imported on first use (``from salsa_lightning import SALSAModule`` as before), so
# that the ``salsa`` command's help and ``salsa configs`` start without Lightning and torch.
_HOMES = {
    "DPOModule": "salsa_lightning.dpo",
    "PreferenceDataModule": "salsa_lightning.data",
    "PromptDataModule": "salsa_lightning.data",
    "RewardModule": "salsa_lightning.reward",
    "SALSAModule": "salsa_lightning.ppo",
    "SFTDataModule": "salsa_lightning.data",
    "SFTModule": "salsa_lightning.sft",
    "SalsaError": "salsa_lightning.errors",
}
__all__ = sorted(_HOMES)

if TYPE_CHECKING:  # what type checkers and editors read
    from salsa_lightning.data import PreferenceDataModule as PreferenceDataModule
    from salsa_lightning.data import PromptDataModule as PromptDataModule
    from salsa_lightning.data import SFTDataModule as SFTDataModule
    from salsa_lightning.dpo import DPOModule as DPOModule
    from salsa_lightning.errors import SalsaError as SalsaError
    from salsa_lightning.ppo import SALSAModule as SALSAModule
    from salsa_lightning.reward import RewardModule as RewardModule
    from salsa_lightning.sft import SFTModule as SFTModule


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'salsa_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
