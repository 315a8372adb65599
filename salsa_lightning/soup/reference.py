"""The PPO stage's KL reference as a soup recipe (YAML: ``reference: {checkpoints, weights}``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from salsa_lightning.errors import SalsaError
from salsa_lightning.frozen import freeze
from salsa_lightning.soup.build import load_soup
from salsa_lightning.soup.files import file_hashes
from salsa_lightning.soup.merge import check_weights
from salsa_lightning.soup.plan import plan_soup


@dataclass
class SoupReference:
    """The PPO KL reference as a soup recipe (YAML: ``reference: {checkpoints, weights}``).

    Attributes:
        checkpoints: Full checkpoint or LoRA adapter directories.
        weights: One weight per checkpoint, or None for uniform.
        normalize: Rescale ``weights`` to sum to 1.
    """

    checkpoints: list[str]
    weights: list[float] | None = None
    normalize: bool = False

    def validate(self) -> None:
        """Run every input check of :func:`write_soup` (nothing is read but headers).

        Raises:
            SalsaError: The first problem found.
        """
        if not self.checkpoints:
            raise SalsaError(
                "reference.checkpoints is empty; list the SFT checkpoint directories to soup"
            )
        self.resolved_weights()
        plan_soup(self.checkpoints)

    def resolved_weights(self) -> list[float]:
        """The validated weights (uniform when ``weights`` is None)."""
        return check_weights(self.weights, len(self.checkpoints), self.normalize)

    def build(self, model_class: Any = None, dtype: torch.dtype | None = None):
        """The frozen soup model (eval mode, ``requires_grad=False``)."""
        self.validate()
        return freeze(load_soup(self.checkpoints, self.resolved_weights(), model_class, dtype))

    def build_each(self, model_class: Any = None, dtype: torch.dtype | None = None) -> list:
        """Each checkpoint as its own frozen model (the Multiple-KL baseline)."""
        self.validate()
        return [freeze(load_soup([c], [1.0], model_class, dtype)) for c in self.checkpoints]

    def fingerprint(self) -> dict:
        """Paths, weights and weight-file sha256s, to detect a changed reference on resume."""
        self.validate()
        plan = plan_soup(self.checkpoints)
        return {
            "kind": plan.kind,
            "checkpoints": [str(s.root.resolve()) for s in plan.sources],
            "weights": self.resolved_weights(),
            "sha256": [file_hashes(s) for s in plan.sources],
            "base_sha256": file_hashes(plan.base) if plan.base else None,
        }
