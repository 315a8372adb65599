"""Log-probabilities and entropies from logits, chunked so no full ``log_softmax`` is built;
one categorical draw per row by inverse transform sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from salsa_lightning.errors import SalsaError


def _row_chunks(n_rows: int, chunk_size: int, name: str = "chunk_size") -> list[slice]:
    if chunk_size < 1:
        raise SalsaError(f"{name} must be a positive integer, got {chunk_size}.")
    return [slice(i, i + chunk_size) for i in range(0, n_rows, chunk_size)]


def _scaled_float(chunk: Tensor, temperature: float) -> Tensor:
    """``chunk / temperature`` in float32 (``chunk`` itself when it is float32 and the
    temperature 1: read it, never write it)."""
    chunk = chunk.float()
    return chunk / temperature if temperature != 1.0 else chunk


def _scaled_copy(chunk: Tensor, temperature: float) -> Tensor:
    """``chunk / temperature`` as a float32 tensor of its own, in one allocation, for the
    in-place steps of :func:`_chunk_grad` to overwrite (``chunk`` is left as it was)."""
    z = chunk.float()
    if z is chunk:
        return chunk / temperature if temperature != 1.0 else chunk.clone()
    return z.div_(temperature) if temperature != 1.0 else z


def _tile_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """A tile's ``(hidden @ weight.T + bias) / temperature`` in float32, divided in place."""
    z = F.linear(hidden, weight, bias).float()  # new either way: float() copies a bf16 tile
    return z.div_(temperature) if temperature != 1.0 else z


def _chunk_logprobs(z: Tensor, tokens: Tensor, overwrite: bool = False) -> tuple[Tensor, Tensor]:
    """``z[token] - logsumexp(z)`` and the logsumexp, over the last dim of float32 logits
    ``z`` [..., V] (``tokens`` [..., 1]). ``overwrite``: ``z`` is the caller's own, and the
    logsumexp's exponentials are taken in it (``torch.logsumexp`` allocates a copy of ``z``)."""
    picked = z.gather(-1, tokens).squeeze(-1)
    if not overwrite:
        lse = torch.logsumexp(z, dim=-1)
    else:  # logsumexp's own steps; an infinite maximum is shifted by 0, as logsumexp does
        m = z.amax(-1, keepdim=True)
        m.masked_fill_(m.isinf(), 0.0)
        lse = z.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))
    return picked - lse, lse


def _chunk_grad(z: Tensor, lse: Tensor, tokens: Tensor, g_out: Tensor, temperature: float):
    """The gradient of ``g_out x log softmax(logits / temperature)[token]`` w.r.t. the logits,
    from ``z`` = logits / temperature: ``(onehot(token) - softmax(z)) x g_out / temperature``
    (``g_out`` [..., 1]), computed in ``z`` (overwritten: a tile's memory is ``z`` alone)."""
    g = z.sub_(lse.unsqueeze(-1)).exp_().mul_(-g_out)
    g.scatter_add_(-1, tokens, g_out)
    return g.div_(temperature) if temperature != 1.0 else g


class _TokenLogprobs(torch.autograd.Function):
    """``log softmax(logits / temperature)[token]``, chunked over rows in forward and backward.

    Only the input logits (no copy), the tokens and the float32 ``[B, T]`` logsumexp are
    saved; backward recomputes the softmax one chunk at a time and writes the gradient
    into a single tensor of the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits, tokens, temperature, chunk_size):
        tokens = tokens.long().unsqueeze(-1)
        out = logits.new_empty(logits.shape[:-1], dtype=torch.float32)
        lse = torch.empty_like(out)
        for rows in _row_chunks(logits.shape[0], chunk_size):
            out[rows], lse[rows] = _chunk_logprobs(
                _scaled_float(logits[rows], temperature), tokens[rows]
            )
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, tokens, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for rows in _row_chunks(logits.shape[0], ctx.chunk_size):
            z = _scaled_copy(logits[rows], ctx.temperature)
            grad[rows] = _chunk_grad(
                z, lse[rows], tokens[rows], grad_out[rows, ..., None], ctx.temperature
            )
        return grad, None, None, None


class _Entropy(torch.autograd.Function):
    """Entropy of ``softmax(logits)``, chunked over rows like :class:`_TokenLogprobs`."""

    @staticmethod
    def forward(ctx, logits, chunk_size):
        entropy = logits.new_empty(logits.shape[:-1], dtype=torch.float32)
        lse = torch.empty_like(entropy)
        for rows in _row_chunks(logits.shape[0], chunk_size):
            z = logits[rows].float()
            lse[rows] = torch.logsumexp(z, dim=-1)
            probs = torch.exp(z - lse[rows].unsqueeze(-1))
            entropy[rows] = lse[rows] - (probs * z).sum(-1)
        ctx.save_for_backward(logits, lse, entropy)
        ctx.chunk_size = chunk_size
        return entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, lse, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for rows in _row_chunks(logits.shape[0], ctx.chunk_size):
            # dH/dz_j = -p_j * (log p_j + H), with log p_j = z_j - lse
            log_p = logits[rows].float() - lse[rows].unsqueeze(-1)
            g = torch.exp(log_p).mul_(log_p.add_(entropy[rows].unsqueeze(-1)))
            grad[rows] = g.mul_(-grad_out[rows].unsqueeze(-1))
        return grad, None


def logprobs_from_logits(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int = 8
) -> Tensor:
    """Log-probabilities of the given tokens under ``softmax(logits / temperature)``.

    Computes ``logit[token] - logsumexp(logits)`` in float32, ``chunk_size`` rows of the
    batch at a time, so no full-size ``log_softmax`` of ``[B, T, V]`` is ever built; the
    backward pass is chunked the same way and only allocates the gradient itself.

    Args:
        logits: ``[B, T, V]``, any float dtype (bf16 is upcast per chunk).
        tokens: ``[B, T]`` long, the token ids whose probability is wanted.
        temperature: Sampling temperature; logits are divided by it first.
        chunk_size: Batch rows processed at once; bounds the extra memory to about two
            float32 copies of ``[chunk_size, T, V]``.

    Returns:
        ``[B, T]`` float32 log-probabilities (differentiable w.r.t. ``logits``).
    """
    if temperature <= 0:
        raise SalsaError(f"temperature must be positive, got {temperature}.")
    _row_chunks(0, chunk_size)  # validate before autograd wraps the error
    return _TokenLogprobs.apply(logits, tokens, float(temperature), int(chunk_size))


class _HeadLogprobs(torch.autograd.Function):
    """``log softmax((hidden @ weight.T + bias) / temperature)[token]`` in tiles of rows: the
    logits of one tile exist at a time, in forward and (recomputed) in backward. ``hits``:
    also whether each token is its logits' argmax (else an empty tensor)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, tile, tied, hits):
        out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        lse = torch.empty_like(out)
        hit = torch.empty(hidden.shape[0] if hits else 0, dtype=torch.bool, device=out.device)
        for rows in _row_chunks(hidden.shape[0], tile):
            z = _tile_logits(hidden[rows], weight, bias, temperature)
            if hits:  # before the logsumexp overwrites z
                hit[rows] = z.argmax(-1) == tokens[rows]
            out[rows], lse[rows] = _chunk_logprobs(z, tokens[rows, None], overwrite=True)
        ctx.save_for_backward(hidden, weight, bias, tokens, lse)
        ctx.temperature, ctx.tile, ctx.tied = temperature, tile, tied
        ctx.mark_non_differentiable(hit)
        return out, hit

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_hit):
        hidden, weight, bias, tokens, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        )
        grad_bias = (
            None
            if bias is None or not ctx.needs_input_grad[2]
            else torch.zeros_like(bias, dtype=torch.float32)
        )
        for rows in _row_chunks(hidden.shape[0], ctx.tile):
            z = _tile_logits(hidden[rows], weight, bias, ctx.temperature)
            g = _chunk_grad(z, lse[rows], tokens[rows, None], grad_out[rows, None], ctx.temperature)
            if grad_hidden is not None:
                grad_hidden[rows] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(g.T, hidden[rows].float())
            if grad_bias is not None:
                grad_bias += g.sum(0)
        if grad_weight is not None and ctx.tied is not None:
            grad_weight = ctx.tied.keep(grad_weight)  # None: the lookup's backward returns it
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


class TiedGradient:
    """The one ``[V, H]`` gradient of an output layer whose weight is also the input embedding:
    :func:`logprobs_from_hidden` (``tied=``) and :meth:`lookup` (the embedding's lookup) build it.

    Autograd would hold the head's weight gradient and the lookup's dense ``[V, H]`` one at
    once, then add them (147 MiB each for gpt2-small in float32). Here the head's backward,
    which runs first (the lookup's output gradient depends on it), leaves its float32 gradient
    to this object; the lookup's backward adds the batch's rows into it in place and returns it
    as the weight's only gradient. A head whose backward finds no lookup's backward still to
    come (none made, or all run) keeps its own gradient, so the sum is right in any order."""

    def __init__(self) -> None:
        self.grad: Tensor | None = None
        self.pending = 0  # lookups made in forward whose backward has not run

    def keep(self, head_grad: Tensor) -> Tensor | None:
        """The head's float32 weight gradient, kept for a lookup still to run its backward
        (None goes to autograd); else the gradient itself."""
        if not self.pending:
            return head_grad
        self.grad = head_grad
        return None

    def take(self) -> Tensor | None:
        """For a lookup's backward: the head's gradient, if kept, which this object then holds
        no more."""
        grad, self.grad = self.grad, None
        self.pending -= 1
        return grad

    def lookup(self, ids: Tensor, weight: Tensor, padding_idx: int | None = None) -> Tensor:
        """``F.embedding(ids, weight, padding_idx)``, whose weight gradient is the head's
        plus the rows of ``ids`` (none for ``padding_idx``, as ``nn.Embedding``)."""
        self.pending += 1
        return _TiedLookup.apply(ids, weight, padding_idx, self)


class _TiedLookup(torch.autograd.Function):
    """An embedding lookup whose backward adds its rows into :class:`TiedGradient`'s."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, tied):
        ctx.save_for_backward(ids)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        ctx.padding_idx, ctx.tied = padding_idx, tied
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        grad = ctx.tied.take()
        if grad is None:
            grad = grad_out.new_zeros(ctx.weight_shape, dtype=torch.float32)
        pad = ctx.padding_idx
        kept = None if pad is None else grad[pad].clone()
        # accumulate=True: serial on the CPU, sorted on CUDA; deterministic on both
        rows = grad_out.reshape(-1, grad.shape[1]).to(grad.dtype)
        grad.index_put_((ids.reshape(-1),), rows, accumulate=True)
        if kept is not None:
            grad[pad] = kept
        return None, grad.to(ctx.weight_dtype), None, None


def logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    tokens: Tensor,
    temperature: float = 1.0,
    tile: int = 256,
    tied: TiedGradient | None = None,
) -> Tensor:
    """Log-probabilities of ``tokens`` under the output layer ``hidden @ weight.T + bias``,
    without ever building the ``[B, T, V]`` logits: ``tile`` positions' logits at a time, in
    float32, recomputed in backward (as TRL's chunked log-prob and Liger's fused linear
    cross-entropy do). The same numbers as :func:`logprobs_from_logits` of the full logits.

    Args:
        hidden: ``[B, T, H]`` last hidden states of the positions that predict ``tokens``.
        weight: ``[V, H]`` the output embedding; ``bias``: ``[V]`` or None.
        tokens: ``[B, T]`` long, the token ids whose probability is wanted.
        temperature: Sampling temperature; logits are divided by it first.
        tile: Positions (over ``B x T``) whose logits exist at once: the extra memory is
            one float32 ``[tile, V]`` (the tile's logits, made its exponentials and its
            gradient in place) and, in backward, the weight's float32 gradient.
        tied: When ``weight`` is also the input embedding and the forward that made
            ``hidden`` looked its tokens up through ``tied.lookup``: the weight's two
            gradients are summed in one tensor (:class:`TiedGradient`).

    Returns:
        ``[B, T]`` float32 log-probabilities (differentiable w.r.t. ``hidden``, ``weight``
        and ``bias``).
    """
    return _head(hidden, weight, bias, tokens, temperature, tile, tied, hits=False)[0]


def logprobs_and_hits_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    tokens: Tensor,
    tile: int = 256,
    tied: TiedGradient | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`logprobs_from_hidden` at temperature 1 (the negative of each token's
    cross-entropy), and whether each token is the argmax of its logits (token accuracy, ties
    going to the first index, as ``argmax``), from the same tiles.

    Returns:
        ``[B, T]`` float32 log-probabilities (differentiable) and ``[B, T]`` bool hits.
    """
    return _head(hidden, weight, bias, tokens, 1.0, tile, tied, hits=True)


def _head(hidden, weight, bias, tokens, temperature, tile, tied, hits) -> tuple[Tensor, Tensor]:
    if temperature <= 0:
        raise SalsaError(f"temperature must be positive, got {temperature}.")
    _row_chunks(0, tile, "tile")
    flat = hidden.reshape(-1, hidden.shape[-1])
    out, hit = _HeadLogprobs.apply(
        flat, weight, bias, tokens.reshape(-1).long(), float(temperature), int(tile), tied, hits
    )
    return out.view(tokens.shape), (hit.view(tokens.shape) if hits else hit)


def entropy_from_logits(logits: Tensor, chunk_size: int = 8) -> Tensor:
    """Entropy of ``softmax(logits)`` at each position.

    Uses ``H = logsumexp(z) - sum(softmax(z) * z)`` in float32, ``chunk_size`` batch rows
    at a time (forward and backward).

    Args:
        logits: ``[B, T, V]``, any float dtype.
        chunk_size: Batch rows processed at once; bounds the extra memory.

    Returns:
        ``[B, T]`` float32 entropies in nats (differentiable w.r.t. ``logits``).
    """
    _row_chunks(0, chunk_size)
    return _Entropy.apply(logits, int(chunk_size))


def inverse_cdf_sample(probs: Tensor, uniform: Tensor) -> Tensor:
    """One draw per row of ``probs`` by inverse transform sampling: the first index whose
    cumulative probability exceeds ``uniform`` x the row's total.

    The draw needs one uniform number per row, where ``torch.multinomial`` draws one
    exponential per vocabulary entry: on the CPU the sampling step of a small model's
    decoding costs an eighth of ``multinomial``'s (45 against 368 us per [16, 384] draw). An
    entry of probability 0 is never drawn (where ``uniform`` x total rounds up to the total,
    the last entry above 0 is).

    Args:
        probs: ``[B, V]`` non-negative weights (rows need not sum to 1).
        uniform: ``[B]`` numbers in ``[0, 1)``.

    Returns:
        ``[B]`` long indices.
    """
    cdf = probs.cumsum(-1)
    target = uniform.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(index, last)
