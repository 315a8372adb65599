"""The recipe of the frozen weights of a SALSA run, written into checkpoints and exports and
checked on resume: the frozen weights themselves are rebuilt from it, never checkpointed. A
moving reference starts from the recipe and moves (``reference_update``): its weights are in
the checkpoint, and the recipe still says where it started (and what ``eval/kl_initial`` is
measured to)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from salsa_lightning.errors import SalsaError
from salsa_lightning.ppo.settings import ReferenceUpdate
from salsa_lightning.soup import SoupReference


def reference_recipe(
    reference: SoupReference,
    mode: str,
    reward_model: str | SoupReference | None,
    update: ReferenceUpdate | None = None,
    reward_mode: str = "soup",
) -> dict[str, Any]:
    """What the frozen weights are made of: enough to rebuild and verify them. A reward-model
    soup is recorded by its fingerprint and how it scores (``reward_mode``)."""
    recipe = {
        "reference": reference.fingerprint(),
        "reference_mode": mode,
        "reward_model": reward_model,
    }
    if isinstance(reward_model, SoupReference):
        recipe["reward_model"] = {**reward_model.fingerprint(), "reward_mode": reward_mode}
    if update is not None:  # absent when frozen: a frozen run's recipe is as it always was
        recipe["reference_update"] = asdict(update)
    return recipe


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
    moved, moves = saved.get("reference_update"), current.get("reference_update")
    if moved != moves:
        raise SalsaError(
            f"this checkpoint was written with model.reference_update {moved}, this run has "
            f"{moves}; resume with the same setting (a moving reference's weights are in the "
            "checkpoint, a frozen one's are rebuilt from its recipe)."
        )
