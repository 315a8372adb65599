"""The recipe of the frozen weights of a SALSA run, written into checkpoints and exports and
checked on resume: the frozen weights themselves are rebuilt from it, never checkpointed."""

from __future__ import annotations

from typing import Any

from salsa_lightning.errors import SalsaError
from salsa_lightning.soup import SoupReference


def reference_recipe(
    reference: SoupReference, mode: str, reward_model: str | None
) -> dict[str, Any]:
    """What the frozen weights are made of: enough to rebuild and verify them."""
    return {
        "reference": reference.fingerprint(),
        "reference_mode": mode,
        "reward_model": reward_model,
    }


def check_same_reference(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume with another reference than the checkpoint's.

    What defines the reference: the weights' contents (paths may move), the soup weights and
    the mode. Older checkpoints without a key are not checked on it.
    """
    was, now = saved["reference"], current["reference"]
    keys = ("sha256", "base_sha256", "weights")
    mode_was = saved.get("reference_mode", current["reference_mode"])
    if any(was.get(k, now[k]) != now[k] for k in keys) or mode_was != current["reference_mode"]:
        raise SalsaError(
            "the reference changed since this checkpoint was written (was "
            f"{saved.get('reference_mode')} of {was['checkpoints']} with weights "
            f"{was.get('weights')}, now {current['reference_mode']} of {now['checkpoints']} "
            f"with weights {now['weights']}); resume with the same reference."
        )
