"""Masked statistics over response tokens, and the masks themselves.

A ``mask`` is a float or bool tensor ``[B, T]`` that is 1 on real response tokens (up to and
including EOS) and 0 on the padding after.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _masked(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Returns ``x`` with masked-out entries set to 0 (even inf/nan) and the mask in x's dtype."""
    keep = mask.bool()
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)), keep.to(x.dtype)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over the positions where ``mask`` is 1.

    Args:
        x: Values, any shape.
        mask: Same shape as ``x`` (float or bool); 1 keeps a position, 0 drops it.
        dim: Dimension to reduce; ``None`` sums over everything.

    Returns:
        A scalar when ``dim`` is None, else ``x`` reduced over ``dim``.
    """
    x, _ = _masked(x, mask)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1.

    Args:
        x: Values, any shape, e.g. ``[B, T]``.
        mask: Same shape as ``x`` (float or bool).
        dim: Dimension to reduce; ``None`` averages over all masked positions.

    Returns:
        A scalar when ``dim`` is None, else ``x`` reduced over ``dim``. Where the mask is
        empty the mean is 0 rather than nan.
    """
    x, m = _masked(x, mask)
    if dim is None:
        return x.sum() / m.sum().clamp(min=1)
    return x.sum(dim) / m.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all masked positions.

    Args:
        x: Values, any shape.
        mask: Same shape as ``x`` (float or bool).
        unbiased: Apply Bessel's correction ``n / (n - 1)``. With a single masked
            position the variance is 0 either way.

    Returns:
        A scalar tensor.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().sum().to(var.dtype)
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    all_sum: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Normalise ``x`` to unit variance (and zero mean) over the masked positions.

    Advantages are whitened with ``shift_mean=True``; rewards are whitened with
    ``shift_mean=False``, which only rescales them and keeps their mean (TRL's convention).

    Args:
        x: Values, ``[B, T]`` or any shape.
        mask: Same shape as ``x`` (float or bool).
        shift_mean: Subtract the mean; when False the mean is added back after scaling.
        eps: Added to the variance before the square root.
        all_sum: Sums a tensor over every process holding a part of the batch (an all-reduce
            under DDP/FSDP), so the mean and variance are the whole batch's, whatever the world
            size; None: this tensor is the whole batch.

    Returns:
        Same shape as ``x``: ``(x - mean) / sqrt(var + eps)`` (``+ mean`` when
        ``shift_mean`` is False), and 0 wherever ``mask`` is 0.
    """
    total = all_sum or (lambda t: t)
    xm, m = _masked(x, mask)
    count = total(m.sum()).clamp(min=1)
    mean = total(xm.sum()) / count
    var = total(_masked((x - mean) ** 2, mask)[0].sum()) / count
    var = var * count / (count - 1).clamp(min=1)  # Bessel's correction, as masked_var
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _masked(whitened, mask)[0]


def response_mask(tokens: Tensor, eos_token_id: int) -> Tensor:
    """Mask of the real tokens of generated responses.

    Args:
        tokens: ``[B, T]`` generated token ids (response only, no prompt).
        eos_token_id: The end-of-sequence id.

    Returns:
        ``[B, T]`` float32: 1 up to and including the first EOS, 0 after it; a row with
        no EOS is all ones.
    """
    is_eos = (tokens == eos_token_id).long()
    eos_before = is_eos.cumsum(dim=-1) - is_eos  # number of EOS strictly before each position
    return (eos_before == 0).float()


def truncate_after_eos(
    tokens: Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[Tensor, Tensor]:
    """Replaces every token after the first EOS with padding.

    Args:
        tokens: ``[B, T]`` generated token ids.
        eos_token_id: The end-of-sequence id.
        pad_token_id: The id written after the first EOS.

    Returns:
        ``(tokens, mask)``: the truncated ``[B, T]`` ids (same dtype) and the float32
        ``[B, T]`` mask from :func:`response_mask`.
    """
    mask = response_mask(tokens, eos_token_id)
    truncated = torch.where(mask.bool(), tokens, torch.full_like(tokens, pad_token_id))
    return truncated, mask
