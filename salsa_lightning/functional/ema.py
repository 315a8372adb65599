"""A moving KL reference: the exponential moving average of the policy's weights.

``ref <- (1 - alpha) * ref + alpha * policy``, in place, over lists of tensors (the
reference's parameters and the policy's, in the same order). ``alpha`` 1 is a hard sync (TR-DPO's
``sync_ref_model`` with ``ref_model_mixup_alpha`` 1), ``alpha`` 0 leaves the reference as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from salsa_lightning.errors import SalsaError


@torch.no_grad()
def ema_(targets: Sequence[Tensor], sources: Sequence[Tensor], alpha: float) -> None:
    """Move each target toward its source in place: ``t <- (1 - alpha) * t + alpha * s``.

    Computed as ``torch.lerp`` (``t + alpha * (s - t)``, and ``s - (s - t) * (1 - alpha)`` for
    ``alpha >= 0.5``), which is exact at both ends: ``alpha`` 0 leaves every bit of ``t``, ``alpha``
    1 copies ``s``. A target of a lower precision than its source (a bf16 reference of an fp32
    policy) is updated in float32 and rounded once: in its own dtype a small ``alpha`` times a
    small difference would round to nothing.

    Args:
        targets: Tensors of any shapes, updated in place (the reference's parameters, or their
            local shards).
        sources: Tensors of the same shapes as ``targets``, in the same order (the policy's).
        alpha: The weight of the source, in [0, 1].

    Raises:
        SalsaError: Different counts or shapes, or ``alpha`` outside [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise SalsaError(f"the EMA weight alpha must lie in [0, 1], got {alpha}")
    if len(targets) != len(sources):
        raise SalsaError(f"EMA of {len(targets)} tensors toward {len(sources)}")
    for i, (t, s) in enumerate(zip(targets, sources, strict=True)):
        if t.shape != s.shape:
            raise SalsaError(
                f"EMA: tensor {i} has shape {list(t.shape)}, its source {list(s.shape)}"
            )
        if t.dtype == s.dtype:
            t.lerp_(s, alpha)
        else:
            wide = torch.promote_types(torch.promote_types(t.dtype, s.dtype), torch.float32)
            t.copy_(t.to(wide).lerp_(s.to(wide), alpha))


def ema_weight_of_start(alpha: float, updates: int) -> float:
    """The weight the starting reference keeps after ``updates`` EMA steps: ``(1 - alpha)^n``.

    After n updates toward a policy that stood still, the reference is
    ``(1 - alpha)^n * ref_0 + (1 - (1 - alpha)^n) * policy``; its half-life is
    ``log(1/2) / log(1 - alpha)`` updates.
    """
    return (1.0 - alpha) ** updates
