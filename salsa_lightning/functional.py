"""The RLHF math as plain functions on tensors.

Nothing here knows about Lightning, models or tokenizers: every function takes and
returns tensors (or floats), so each can be tested against a hand-worked example.

Shapes use ``B`` for the batch, ``T`` for the response length (the tokens after the
prompt) and ``V`` for the vocabulary. A ``mask`` is a float or bool tensor ``[B, T]``
that is 1 on real response tokens (up to and including EOS) and 0 on the padding after.

The PPO pieces follow Ziegler et al. 2019 / Stiennon et al. 2020 as implemented in
TRL and torchtune: a per-token KL penalty, the sequence score added at the last real
token, GAE over the response, and the clipped policy and value objectives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from salsa_lightning.errors import SalsaError

__all__ = [
    "AdaptiveKLController",
    "bootstrap_mean_ci",
    "bradley_terry_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_estimate",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "response_mask",
    "reward_centering_loss",
    "token_rewards",
    "truncate_after_eos",
    "weighted_kl_estimate",
    "win_rate",
]

KL_ESTIMATORS = ("k1", "k2", "k3")


# --------------------------------------------------------------------------- masked statistics


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


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to unit variance (and zero mean) over the masked positions.

    Advantages are whitened with ``shift_mean=True``; rewards are whitened with
    ``shift_mean=False``, which only rescales them and keeps their mean (TRL's convention).

    Args:
        x: Values, ``[B, T]`` or any shape.
        mask: Same shape as ``x`` (float or bool).
        shift_mean: Subtract the mean; when False the mean is added back after scaling.
        eps: Added to the variance before the square root.

    Returns:
        Same shape as ``x``: ``(x - mean) / sqrt(var + eps)`` (``+ mean`` when
        ``shift_mean`` is False), and 0 wherever ``mask`` is 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _masked(whitened, mask)[0]


# --------------------------------------------------------------------------- logits


def _row_chunks(n_rows: int, chunk_size: int) -> list[slice]:
    if chunk_size < 1:
        raise SalsaError(f"chunk_size must be a positive integer, got {chunk_size}.")
    return [slice(i, i + chunk_size) for i in range(0, n_rows, chunk_size)]


def _scaled_float(chunk: Tensor, temperature: float) -> Tensor:
    chunk = chunk.float()
    return chunk / temperature if temperature != 1.0 else chunk


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
            z = _scaled_float(logits[rows], temperature)
            lse[rows] = torch.logsumexp(z, dim=-1)
            out[rows] = z.gather(-1, tokens[rows]).squeeze(-1) - lse[rows]
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, tokens, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for rows in _row_chunks(logits.shape[0], ctx.chunk_size):
            z = _scaled_float(logits[rows], ctx.temperature)
            g_out = grad_out[rows].unsqueeze(-1)
            # d/dz (z[tok] - lse(z)) = onehot(tok) - softmax(z)
            g = torch.exp(z - lse[rows].unsqueeze(-1)).mul_(-g_out)
            g.scatter_add_(-1, tokens[rows], g_out)
            grad[rows] = g / ctx.temperature
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


# --------------------------------------------------------------------------- KL and rewards


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from tokens sampled from ``pi``.

    With ``r = ref_logprobs - logprobs`` (Schulman, "Approximating KL divergence"):
    ``k1 = -r`` (unbiased, can be negative), ``k2 = r**2 / 2`` (biased, low variance) and
    ``k3 = exp(r) - 1 - r`` (unbiased and always >= 0).

    Args:
        logprobs: ``[B, T]`` log-probabilities of the sampled tokens under the policy.
        ref_logprobs: ``[B, T]`` the same tokens under the reference model.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        ``[B, T]`` per-token KL estimates.
    """
    r = ref_logprobs - logprobs
    if estimator == "k1":
        return -r
    if estimator == "k2":
        return 0.5 * r**2
    if estimator == "k3":
        return torch.expm1(r) - r
    raise SalsaError(f"Unknown KL estimator {estimator!r}; use one of {', '.join(KL_ESTIMATORS)}.")


def weighted_kl_estimate(
    logprobs: Tensor,
    ref_logprobs_list: Sequence[Tensor],
    weights: Sequence[float],
    estimator: str = "k1",
) -> Tensor:
    """Weighted sum of KL estimates against several references (the "Multiple KLs" baseline).

    Args:
        logprobs: ``[B, T]`` policy log-probabilities of the sampled tokens.
        ref_logprobs_list: One ``[B, T]`` tensor per reference model.
        weights: One weight per reference.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``, see :func:`kl_estimate`.

    Returns:
        ``[B, T]``: ``sum_i weights[i] * kl_estimate(logprobs, ref_logprobs_list[i])``.
    """
    if len(ref_logprobs_list) == 0:
        raise SalsaError("weighted_kl_estimate needs at least one reference.")
    if len(weights) != len(ref_logprobs_list):
        raise SalsaError(
            f"weighted_kl_estimate got {len(weights)} weights for "
            f"{len(ref_logprobs_list)} references; give one weight per reference."
        )
    total = None
    for w, ref in zip(weights, ref_logprobs_list, strict=True):
        term = float(w) * kl_estimate(logprobs, ref, estimator)
        total = term if total is None else total + term
    return total


def token_rewards(scores: Tensor, kl: Tensor, kl_coef: float, mask: Tensor) -> Tensor:
    """Per-token rewards: a KL penalty on every token plus the score at the last one.

    Args:
        scores: ``[B]`` sequence-level rewards (e.g. from a reward model).
        kl: ``[B, T]`` per-token KL estimates.
        kl_coef: Weight of the KL penalty.
        mask: ``[B, T]`` response mask.

    Returns:
        ``[B, T]``: ``-kl_coef * kl`` on masked tokens, 0 elsewhere, with ``scores[b]`` added
        at the last masked position of row ``b`` (rows with an empty mask get no score).
    """
    keep = mask.bool()
    rewards = torch.where(keep, -kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    positions = torch.arange(kl.shape[-1], device=kl.device)
    last = torch.where(keep, positions, -1).amax(dim=-1)  # -1 for an empty row
    at_last = positions == last.unsqueeze(-1)  # all False for an empty row
    return rewards + at_last.to(rewards.dtype) * scores.to(rewards.dtype).unsqueeze(-1)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``,
    computed by a backwards loop over ``T``. Values and rewards outside the mask count as
    0, so the value after the last real token (EOS) is 0: the episode ends there.

    Args:
        rewards: ``[B, T]`` per-token rewards (see :func:`token_rewards`).
        values: ``[B, T]`` value estimates from the rollout (normally detached).
        mask: ``[B, T]`` response mask.
        gamma: Discount factor.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``[B, T]``, with ``returns = advantages + values``;
        both are 0 outside the mask.
    """
    keep = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(keep, values, zero)
    rewards = torch.where(keep, rewards, zero)
    T = rewards.shape[-1]
    next_value = torch.zeros_like(values[..., 0])
    next_advantage = torch.zeros_like(values[..., 0])
    advantages = []
    for t in reversed(range(T)):
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        next_advantage = delta + gamma * lam * next_advantage
        next_value = values[..., t]
        advantages.append(next_advantage)
    advantages = torch.stack(advantages[::-1], dim=-1)
    advantages = torch.where(keep, advantages, zero)
    returns = torch.where(keep, advantages + values, zero)
    return advantages, returns


# --------------------------------------------------------------------------- PPO losses


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
    max_log_ratio: float = 20.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate policy loss.

    Args:
        logprobs: ``[B, T]`` log-probabilities under the current policy (with grad).
        old_logprobs: ``[B, T]`` log-probabilities under the rollout policy.
        advantages: ``[B, T]`` advantages.
        mask: ``[B, T]`` response mask.
        clip_range: PPO's epsilon; the ratio is clipped to ``[1 - eps, 1 + eps]``.
        max_log_ratio: The log-ratio is clamped to ``[-max, max]`` before ``exp`` so a
            stale or broken batch cannot produce inf/nan.

    Returns:
        ``(loss, clipfrac, approxkl)``, all scalars: ``loss`` is the masked mean of
        ``max(-A * ratio, -A * clip(ratio))``; ``clipfrac`` the masked fraction of tokens
        where the clipped term was strictly larger; ``approxkl`` is
        ``0.5 * masked_mean(log_ratio**2)``. The last two are detached.
    """
    log_ratio = (logprobs - old_logprobs).clamp(-max_log_ratio, max_log_ratio)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(loss.dtype), mask).detach()
    approxkl = (0.5 * masked_mean(log_ratio**2, mask)).detach()
    return loss, clipfrac, approxkl


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float = 0.2
) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss.

    Args:
        values: ``[B, T]`` current value predictions (with grad).
        old_values: ``[B, T]`` value predictions from the rollout.
        returns: ``[B, T]`` value targets (see :func:`gae`).
        mask: ``[B, T]`` response mask.
        clip_range: Values are clipped to ``old_values +- clip_range``.

    Returns:
        ``(loss, clipfrac)``, scalars: ``loss = 0.5 * masked_mean(max((v - R)^2,
        (clip(v, old - eps, old + eps) - R)^2))``; ``clipfrac`` (detached) is the masked
        fraction where the clipped term was strictly larger.
    """
    values_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(loss.dtype), mask).detach()
    return loss, clipfrac


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """How much of the variance of the returns the value head explains.

    Args:
        values: ``[B, T]`` value predictions.
        returns: ``[B, T]`` value targets.
        mask: ``[B, T]`` response mask.

    Returns:
        Scalar ``1 - var(returns - values) / var(returns)`` over the masked positions: 1
        for perfect predictions, 0 for predicting the mean, negative when worse. When
        ``var(returns)`` is 0 the result is 0 (never nan).
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    nonzero = var_returns > 0
    safe = torch.where(nonzero, var_returns, torch.ones_like(var_returns))
    return torch.where(nonzero, 1.0 - var_residual / safe, torch.zeros_like(var_returns))


# --------------------------------------------------------------------------- reward model


def bradley_terry_loss(
    chosen: Tensor, rejected: Tensor, margin: Tensor | float | None = None
) -> Tensor:
    """Pairwise reward-model loss, ``-log sigmoid(chosen - rejected - margin)``.

    Args:
        chosen: ``[B]`` scores of the preferred responses.
        rejected: ``[B]`` scores of the other responses.
        margin: Optional ``[B]`` tensor or float subtracted inside the sigmoid (Llama 2's
            margin for strongly preferred pairs); None means 0.

    Returns:
        Scalar mean loss.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def reward_centering_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Auxiliary term that keeps reward scores centred on 0 (Eisenstein et al. 2023).

    Args:
        chosen: ``[B]`` scores of the preferred responses.
        rejected: ``[B]`` scores of the other responses.

    Returns:
        Scalar ``mean((chosen + rejected)**2)``; the caller multiplies it by a coefficient.
    """
    return ((chosen + rejected) ** 2).mean()


# --------------------------------------------------------------------------- generated tokens


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


# --------------------------------------------------------------------------- KL controller


class AdaptiveKLController:
    """The KL coefficient controller of Ziegler et al. 2019.

    After each batch, ``value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``,
    so the coefficient grows while the measured KL is above ``target`` and shrinks while
    it is below. With ``target=None`` the coefficient stays fixed.

    Attributes:
        value: The current KL coefficient.
        target: The KL to steer towards, or None for a fixed coefficient.
        horizon: Number of steps over which a 20% error changes the coefficient by 20%.
    """

    def __init__(self, init_kl_coef: float, target: float | None = None, horizon: int = 10000):
        if init_kl_coef < 0:
            raise SalsaError(f"init_kl_coef must be >= 0, got {init_kl_coef}.")
        if target is not None and target <= 0:
            raise SalsaError(
                f"KL target must be positive (or None for a fixed coefficient), got {target}."
            )
        if horizon <= 0:
            raise SalsaError(f"KL horizon must be positive, got {horizon}.")
        self.value = float(init_kl_coef)
        self.target = None if target is None else float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Moves the coefficient towards the target.

        Args:
            current_kl: The measured KL of the last batch (float or scalar tensor).
            n_steps: Number of samples (or steps) the measurement covers.
        """
        if self.target is None:
            return
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        """Returns the controller's state (the current coefficient)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Restores the coefficient; target and horizon stay as constructed."""
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"


# --------------------------------------------------------------------------- evaluation


def bootstrap_mean_ci(
    values: Tensor, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Percentile-bootstrap confidence interval of the mean.

    Args:
        values: 1-D tensor of per-item values ``[N]``.
        n_resamples: Number of bootstrap resamples.
        confidence: Coverage of the interval, in (0, 1).
        seed: Seed of the ``torch.Generator`` drawing the resamples; same seed, same
            interval.

    Returns:
        ``(mean, low, high)`` as floats.
    """
    values = values.detach().reshape(-1).to("cpu", torch.float64)
    if values.numel() == 0:
        raise SalsaError("bootstrap_mean_ci needs at least one value.")
    if not 0.0 < confidence < 1.0:
        raise SalsaError(f"confidence must be in (0, 1), got {confidence}.")
    if n_resamples < 1:
        raise SalsaError(f"n_resamples must be positive, got {n_resamples}.")
    generator = torch.Generator().manual_seed(seed)
    n = values.numel()
    idx = torch.randint(0, n, (n_resamples, n), generator=generator)
    means = values[idx].mean(dim=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return float(values.mean()), float(low), float(high)


def win_rate(a: Tensor, b: Tensor) -> Tensor:
    """Per-item wins of ``a`` over ``b``.

    Args:
        a: ``[N]`` scores.
        b: ``[N]`` scores.

    Returns:
        ``[N]`` float32: 1 where ``a > b``, 0.5 where equal, 0 otherwise; its mean is the
        win rate with ties counted as half.
    """
    return (a > b).float() + 0.5 * (a == b).float()
