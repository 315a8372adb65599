"""The soup's arithmetic on tensors: weights, weighted averages and merged LoRA weights.

Pure functions (no files, no models): :mod:`salsa_lightning.soup.build` feeds them tensors read
one at a time from the checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from salsa_lightning.errors import SalsaError


def check_weights(weights: Sequence[float] | None, n: int, normalize: bool = False) -> list[float]:
    """Validate soup weights.

    Args:
        weights: One weight per checkpoint, or None for the uniform soup.
        n: Number of checkpoints.
        normalize: Rescale the weights to sum to 1 instead of requiring it.

    Returns:
        The weights as floats summing to 1.

    Raises:
        SalsaError: Empty soup, wrong count, a negative or non-finite weight, all zeros,
            or (without ``normalize``) a sum that is not 1 within 1e-6.
    """
    if n < 1:
        raise SalsaError("a soup needs at least one checkpoint; pass --checkpoints DIR [DIR ...]")
    if weights is None:
        return [1.0 / n] * n
    out = [float(w) for w in weights]
    if len(out) != n:
        raise SalsaError(
            f"got {len(out)} weights for {n} checkpoints; pass exactly one weight per "
            "checkpoint (or none for a uniform soup)"
        )
    for i, w in enumerate(out):
        if not math.isfinite(w):
            raise SalsaError(f"weight {i} ({w}) is not a finite number")
        if w < 0:
            raise SalsaError(f"weight {i} is negative ({w}); soup weights must be >= 0")
    total = sum(out)
    if total <= 0:
        raise SalsaError("all soup weights are zero; give at least one positive weight")
    if normalize:
        return [w / total for w in out]
    if abs(total - 1.0) > 1e-6:
        raise SalsaError(
            f"weights {out} sum to {total:.6g}, not 1; fix them, or rescale them with "
            "normalize (`salsa soup --normalize`; `normalize: true` beside the weights in a "
            "YAML such as model.reference)"
        )
    return out


def weighted_sum(name: str, tensors: Iterable[Tensor], weights: Sequence[float]) -> Tensor:
    """Weighted sum of one tensor across inputs, consuming ``tensors`` one at a time.

    Floating tensors accumulate in at least float32 (bf16/fp16 sums would lose precision)
    and are cast back to the first input's dtype. Non-float tensors (e.g. integer buffers)
    cannot be averaged; they must be equal and are returned unchanged.
    """
    acc: Tensor | None = None
    first: Tensor | None = None
    for t, w in zip(tensors, weights, strict=True):
        if first is None:
            first = t
            if not t.is_floating_point():
                continue
            acc = t.to(torch.promote_types(t.dtype, torch.float32)) * w
        elif not first.is_floating_point():
            if not torch.equal(first, t):
                raise SalsaError(
                    f"non-float tensor '{name}' differs between checkpoints and cannot be "
                    "averaged; such tensors must be identical in every input"
                )
        else:
            acc.add_(t.to(acc.dtype), alpha=w)
    assert first is not None
    return first if acc is None else acc.to(first.dtype)


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> dict[str, Tensor]:
    """Weighted average of state dicts (pure: the inputs are not modified).

    Args:
        state_dicts: State dicts with the same keys, shapes and dtypes.
        weights: One weight per state dict (use :func:`check_weights` first).

    Returns:
        A new state dict in the inputs' dtype.

    Raises:
        SalsaError: Different keys, shapes or dtypes, or non-float tensors that differ.
    """
    if len(state_dicts) != len(weights) or not state_dicts:
        raise SalsaError(f"got {len(state_dicts)} state dicts and {len(weights)} weights")
    ref = state_dicts[0]
    for i, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != set(ref):
            diff = sorted(set(sd) ^ set(ref))
            raise SalsaError(f"state dict {i} and state dict 0 differ in tensor '{diff[0]}'")
        for k, t in sd.items():
            if t.shape != ref[k].shape or t.dtype != ref[k].dtype:
                raise SalsaError(
                    f"state dict {i}: tensor '{k}' is {list(t.shape)} {t.dtype}, but state "
                    f"dict 0 has {list(ref[k].shape)} {ref[k].dtype}"
                )
    return {k: weighted_sum(k, (sd[k] for sd in state_dicts), weights) for k in ref}


def lora_scale(cfg: dict) -> float:
    r, alpha = cfg["r"], cfg["lora_alpha"]
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def merged_lora_weight(
    base: Tensor,
    factors: Iterable[tuple[Tensor, Tensor, float]],
    weights: Sequence[float],
    transposed: bool = False,
) -> Tensor:
    """The soup of LoRA fine-tunes of one base weight: the average of the merged models.

    ``W = W_base + sum_i w_i * s_i * B_i @ A_i`` (averaging A and B separately would add the
    cross terms ``B_i @ A_j``), accumulated in at least float32.

    Args:
        base: The base weight ``[out, in]`` (``[in, out]`` when ``transposed``).
        factors: One ``(B_i [out, r_i], A_i [r_i, in], s_i)`` per adapter, consumed one at a time.
        weights: One weight ``w_i`` per adapter.
        transposed: The base stores the weight transposed (embedding LoRA, ``fan_in_fan_out``).

    Returns:
        The merged weight in ``base``'s dtype and shape.
    """
    acc = base.to(torch.promote_types(base.dtype, torch.float32))
    for (b, a, scale), w in zip(factors, weights, strict=True):
        delta = b.to(acc.dtype) @ a.to(acc.dtype)
        acc.add_(delta.T if transposed else delta, alpha=w * scale)
    return acc.to(base.dtype)


def concatenated_lora(
    factors: Sequence[tuple[Tensor, Tensor, float]], weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """One adapter exactly equal to the soup of several: rank concatenation.

    ``A = cat_i A_i`` (rows) and ``B = cat_i w_i s_i B_i`` (columns) give
    ``B @ A = sum_i w_i s_i B_i @ A_i``, so with scale 1 (``lora_alpha = r = sum_i r_i``) the
    adapter's update is the soup's.

    Args:
        factors: One ``(B_i [out, r_i], A_i [r_i, in], s_i)`` per adapter.
        weights: One weight per adapter.

    Returns:
        ``(B [out, sum r_i], A [sum r_i, in])`` in the inputs' dtypes.
    """
    a = torch.cat([a for _, a, _ in factors], dim=0)
    b = torch.cat(
        [(b.float() * (w * s)).to(b.dtype) for (b, _, s), w in zip(factors, weights, strict=True)],
        dim=1,
    )
    return b, a
