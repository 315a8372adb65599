"""Tests for salsa_lightning.functional: hand-worked values and naive reference loops."""

import math
import statistics

import pytest
import torch

from salsa_lightning import functional as Fn
from salsa_lightning.errors import SalsaError

# --------------------------------------------------------------------------- helpers


def ragged_mask(lengths, T):
    return torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])


def naive_gae(rewards, values, mask, gamma, lam):
    """Per-row Python loop over the real tokens only; value after the last one is 0."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        L = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(L)):
            next_value = float(values[b, t + 1]) if t + 1 < L else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            adv[b, t] = running
    ret = (adv + values.double()) * mask.double()
    return adv, ret


# --------------------------------------------------------------------------- masked statistics

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_masked_sum_and_mean_by_hand():
    # masked values 1, 2, 4: sum 7, mean 7/3; per row: sums [3, 4], means [1.5, 4]
    assert Fn.masked_sum(X, M).item() == pytest.approx(7.0)
    assert Fn.masked_mean(X, M).item() == pytest.approx(7 / 3)
    torch.testing.assert_close(Fn.masked_sum(X, M, dim=1), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(Fn.masked_mean(X, M, dim=1), torch.tensor([1.5, 4.0]))
    torch.testing.assert_close(Fn.masked_mean(X, M, dim=0), torch.tensor([2.5, 2.0, 0.0]))


def test_masked_var_by_hand():
    # values 1, 2, 4, mean 7/3; deviations -4/3, -1/3, 5/3; squares sum 42/9 = 14/3
    # biased 14/3 / 3 = 14/9; unbiased 14/3 / 2 = 7/3
    assert Fn.masked_var(X, M, unbiased=False).item() == pytest.approx(14 / 9)
    assert Fn.masked_var(X, M).item() == pytest.approx(7 / 3)


def test_masked_stats_ignore_padding():
    changed = X.clone()
    changed[M == 0] = torch.tensor([1e9, float("inf"), float("nan")])
    for fn in (Fn.masked_sum, Fn.masked_mean):
        torch.testing.assert_close(fn(changed, M), fn(X, M))
        torch.testing.assert_close(fn(changed, M, dim=1), fn(X, M, dim=1))
    torch.testing.assert_close(Fn.masked_var(changed, M), Fn.masked_var(X, M))
    torch.testing.assert_close(Fn.masked_whiten(changed, M), Fn.masked_whiten(X, M))


def test_masked_stats_accept_bool_mask_and_empty_mask():
    torch.testing.assert_close(Fn.masked_mean(X, M.bool()), Fn.masked_mean(X, M))
    empty = torch.zeros_like(M)
    assert Fn.masked_mean(X, empty).item() == 0.0
    assert Fn.masked_var(X, M * torch.tensor([[1.0, 0, 0], [0, 0, 0]])).item() == 0.0


def test_masked_whiten():
    torch.manual_seed(0)
    x = torch.randn(4, 7) * 3 + 2
    mask = ragged_mask([7, 5, 1, 3], 7)
    w = Fn.masked_whiten(x, mask)
    assert Fn.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert Fn.masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-4)
    assert (w[mask == 0] == 0).all()

    w_noshift = Fn.masked_whiten(x, mask, shift_mean=False)
    mean = Fn.masked_mean(x, mask)
    assert Fn.masked_mean(w_noshift, mask).item() == pytest.approx(mean.item(), abs=1e-5)
    assert Fn.masked_var(w_noshift, mask).item() == pytest.approx(1.0, abs=1e-4)
    assert (w_noshift[mask == 0] == 0).all()


# --------------------------------------------------------------------------- logits


def naive_logprobs(logits, tokens, temperature=1.0):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 2, 8])
def test_logprobs_match_log_softmax(dtype, temperature, chunk_size):
    torch.manual_seed(0)
    B, T, V = 5, 4, 11  # B = 5 is not a multiple of 2: the last chunk is short
    logits = (torch.randn(B, T, V) * 4).to(dtype)
    tokens = torch.randint(0, V, (B, T))
    out = Fn.logprobs_from_logits(logits, tokens, temperature=temperature, chunk_size=chunk_size)
    assert out.dtype == torch.float32
    assert out.shape == (B, T)
    torch.testing.assert_close(out, naive_logprobs(logits, tokens, temperature))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.9])
def test_logprobs_gradient_matches_naive(dtype, temperature):
    torch.manual_seed(0)
    logits = torch.randn(5, 4, 6).to(dtype).requires_grad_()
    tokens = torch.randint(0, 6, (5, 4))
    weights = torch.randn(5, 4)
    out = Fn.logprobs_from_logits(logits, tokens, temperature, chunk_size=2)
    (out * weights).sum().backward()
    grad = logits.grad.clone()
    assert grad.dtype == dtype
    logits.grad = None
    (naive_logprobs(logits, tokens, temperature) * weights).sum().backward()
    torch.testing.assert_close(grad, logits.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("tile", [1, 3, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_logprobs_from_hidden_match_the_logits_path(dtype, temperature, tile, bias):
    """The output layer applied in tiles gives the log-probs of the full logits, and the same
    gradients for the hidden states, the weight and the bias (20 positions: the last tile of 3
    is short; repeated tokens must add up in the weight's gradient)."""
    torch.manual_seed(0)
    B, T, H, V = 4, 5, 8, 13
    hidden = torch.randn(B, T, H).to(dtype).requires_grad_()
    weight = torch.randn(V, H).to(dtype).requires_grad_()
    b = torch.randn(V).to(dtype).requires_grad_() if bias else None
    tokens = torch.randint(0, V, (B, T))
    tokens[0] = 3
    weights = torch.randn(B, T)
    leaves = [hidden, weight] + ([b] if bias else [])
    out = Fn.logprobs_from_hidden(hidden, weight, b, tokens, temperature, tile=tile)
    (out * weights).sum().backward()
    grads = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    full = Fn.logprobs_from_logits(
        torch.nn.functional.linear(hidden, weight, b), tokens, temperature
    )
    (full * weights).sum().backward()
    assert out.dtype == torch.float32 and out.shape == (B, T)
    torch.testing.assert_close(out, full)
    tol = {"atol": 0.05, "rtol": 0.02} if dtype == torch.bfloat16 else {}
    for grad, x in zip(grads, leaves, strict=True):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad, x.grad, **tol)


def tied_layer_grads(tied, dtype, padding_idx, independent=False):
    """Gradients of a tied embedding/head pair: tokens looked up (through ``tied`` when given),
    a small nonlinear map to hidden states, log-probs in tiles of 3. ``independent``: the
    head reads other hidden states, made before the lookup, so autograd runs the lookup's
    backward first (newest node first)."""
    torch.manual_seed(0)
    B, T, H, V = 3, 4, 6, 11
    weight = torch.randn(V, H).to(dtype).requires_grad_()
    mix = torch.randn(H, H).to(dtype).requires_grad_()
    ids = torch.randint(0, V, (B, T))
    ids[0, :2] = 2  # repeated tokens, and the padding id where padding_idx is 2
    tokens, scale = torch.randint(0, V, (B, T)), torch.randn(B, T)

    def lookup():
        if tied is None:
            return torch.nn.functional.embedding(ids, weight, padding_idx)
        return tied.lookup(ids, weight, padding_idx)

    def head(hidden):
        out = Fn.logprobs_from_hidden(hidden, weight, None, tokens, 0.7, tile=3, tied=tied)
        return (out * scale).sum()

    if independent:
        loss = head(torch.tanh(torch.randn(B, T, H).to(dtype) @ mix))
        loss = loss + (torch.tanh(lookup() @ mix).float() ** 2).sum()
    else:
        loss = head(torch.tanh(lookup() @ mix))
    loss.backward()
    return weight.grad, mix.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("independent", [False, True])
def test_a_tied_gradient_sums_the_head_and_the_lookup_as_autograd_does(
    dtype, padding_idx, independent
):
    """The weight's one gradient (the head's, kept aside, plus the lookup's rows added in place)
    equals autograd's sum of the two: repeated tokens add up, the padding id's row gets the
    head's part alone, and the sum is right when the lookup's backward runs first."""
    tied = Fn.TiedGradient()
    weight_grad, mix_grad = tied_layer_grads(tied, dtype, padding_idx, independent)
    ref_weight_grad, ref_mix_grad = tied_layer_grads(None, dtype, padding_idx, independent)
    tol = {"atol": 0.05, "rtol": 0.02} if dtype == torch.bfloat16 else {}
    assert weight_grad.dtype == dtype and tied.grad is None  # handed over, not held
    torch.testing.assert_close(weight_grad, ref_weight_grad, **tol)
    torch.testing.assert_close(mix_grad, ref_mix_grad, **tol)


def test_a_tied_gradient_without_a_lookup_leaves_the_head_its_own():
    """A head given a TiedGradient that no lookup went through (a forward from embeddings, say)
    returns its weight gradient to autograd rather than keep it for nobody."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 3, 4), torch.randn(9, 4).requires_grad_()
    tokens = torch.randint(0, 9, (2, 3))
    tied = Fn.TiedGradient()
    Fn.logprobs_from_hidden(hidden, weight, None, tokens, tied=tied).sum().backward()
    plain = weight.detach().clone().requires_grad_()
    Fn.logprobs_from_logits(hidden @ plain.T, tokens).sum().backward()
    torch.testing.assert_close(weight.grad, plain.grad)
    assert tied.grad is None


def test_hits_from_hidden_are_the_logits_argmax_ties_to_the_first():
    """The tiles' hits are ``argmax(logits) == token``: a row of equal logits (the weight's
    rows 0 and 1 alike, the hidden state 0) hits token 0 and misses token 1, as ``argmax``."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 7, 5), torch.randn(11, 5)
    hidden[0, :2] = 0.0  # all logits 0: a tie over the whole vocabulary
    tokens = torch.randint(0, 11, (2, 7))
    tokens[0, 0], tokens[0, 1] = 0, 1
    logits = hidden @ weight.T
    tokens[1, :3] = logits[1, :3].argmax(-1)  # some hits off the tie
    logprobs, hits = Fn.logprobs_and_hits_from_hidden(hidden, weight, None, tokens, tile=3)
    torch.testing.assert_close(logprobs, Fn.logprobs_from_logits(logits, tokens))
    assert hits.dtype == torch.bool and hits.shape == tokens.shape
    assert torch.equal(hits, logits.argmax(-1) == tokens)
    assert hits[0, 0] and not hits[0, 1] and hits[1, :3].all()


def test_logprobs_from_hidden_rejects_bad_arguments():
    hidden, weight = torch.randn(1, 2, 3), torch.randn(4, 3)
    tokens = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        Fn.logprobs_from_hidden(hidden, weight, None, tokens, temperature=0.0)
    with pytest.raises(ValueError, match="tile must be a positive integer, got 0"):
        Fn.logprobs_from_hidden(hidden, weight, None, tokens, tile=0)


def test_logprobs_without_grad_and_repeated_tokens():
    # the same token at every position of a row: scatter_add must add, not overwrite
    logits = torch.randn(3, 4, 5, requires_grad=True)
    tokens = torch.full((3, 4), 2)
    Fn.logprobs_from_logits(logits, tokens, chunk_size=2).sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    naive_logprobs(logits, tokens).sum().backward()
    torch.testing.assert_close(grad, logits.grad)
    with torch.no_grad():
        out = Fn.logprobs_from_logits(logits, tokens)
    assert not out.requires_grad


def test_logprobs_rejects_bad_arguments():
    logits = torch.randn(1, 2, 3)
    tokens = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        Fn.logprobs_from_logits(logits, tokens, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        Fn.logprobs_from_logits(logits, tokens, chunk_size=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_matches_naive(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(5, 3, 9) * 3).to(dtype)
    p = torch.softmax(logits.float(), -1)
    naive = -(p * torch.log_softmax(logits.float(), -1)).sum(-1)
    out = Fn.entropy_from_logits(logits, chunk_size=2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, naive)
    # uniform over V tokens: entropy log(V)
    assert Fn.entropy_from_logits(torch.zeros(1, 1, 9)).item() == pytest.approx(math.log(9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_gradient_matches_naive(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(5, 2, 7) * 2).to(dtype).requires_grad_()
    weights = torch.randn(5, 2)
    (Fn.entropy_from_logits(logits, chunk_size=2) * weights).sum().backward()
    grad = logits.grad.clone()
    assert grad.dtype == dtype
    logits.grad = None
    z = logits.float()
    naive = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    (naive * weights).sum().backward()
    torch.testing.assert_close(grad, logits.grad)


# --------------------------------------------------------------------------- KL


def test_inverse_cdf_sample_by_hand():
    """Weights [0, 1, 3] (cumulative 0, 1, 4; total 4): u in [0, 1/4) draws index 1, u in
    [1/4, 1) index 2; index 0 (weight 0) never, not even at u = 0. Rows need not sum to 1."""
    probs = torch.tensor([[0.0, 1.0, 3.0]]).expand(5, 3)
    u = torch.tensor([0.0, 0.2, 0.25, 0.5, 0.999])
    assert Fn.inverse_cdf_sample(probs, u).tolist() == [1, 1, 2, 2, 2]


def test_inverse_cdf_sample_never_draws_a_zero_weight_at_the_end():
    """Where u x total rounds up to the total (u = 1 here), the last entry above 0 is drawn,
    not the zero-weight entries after it."""
    probs = torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert Fn.inverse_cdf_sample(probs, torch.ones(2)).tolist() == [1, 3]


def test_inverse_cdf_sample_frequencies_match_the_probabilities():
    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3]).expand(20000, 4)
    draws = Fn.inverse_cdf_sample(probs, torch.rand(20000))
    freq = torch.bincount(draws, minlength=4).float() / 20000
    assert freq[1] == 0
    assert torch.allclose(freq, probs[0], atol=0.015)


def test_kl_estimators_by_hand():
    logprobs = torch.tensor([[0.0, -1.0]])
    ref = torch.tensor([[-1.0, 0.0]])
    # r = ref - logprobs = [-1, 1]
    # k1 = -r = [1, -1]; k2 = r^2/2 = [0.5, 0.5]; k3 = e^r - 1 - r = [e^-1, e - 2]
    torch.testing.assert_close(Fn.kl_estimate(logprobs, ref, "k1"), torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(Fn.kl_estimate(logprobs, ref, "k2"), torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(
        Fn.kl_estimate(logprobs, ref, "k3"), torch.tensor([[math.exp(-1), math.e - 2]])
    )
    assert torch.equal(Fn.kl_estimate(logprobs, ref), Fn.kl_estimate(logprobs, ref, "k1"))


def test_kl_k3_nonnegative_and_zero_at_equality():
    torch.manual_seed(0)
    a, b = torch.randn(8, 16) * 5, torch.randn(8, 16) * 5
    assert (Fn.kl_estimate(a, b, "k3") >= 0).all()
    for est in Fn.KL_ESTIMATORS:
        assert (Fn.kl_estimate(a, a, est) == 0).all()


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        Fn.kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_weighted_kl():
    torch.manual_seed(0)
    lp, r1, r2 = torch.randn(3, 2, 5)
    for est in Fn.KL_ESTIMATORS:
        torch.testing.assert_close(
            Fn.weighted_kl_estimate(lp, [r1], [1.0], est), Fn.kl_estimate(lp, r1, est)
        )
        expected = 0.3 * Fn.kl_estimate(lp, r1, est) + 0.7 * Fn.kl_estimate(lp, r2, est)
        torch.testing.assert_close(Fn.weighted_kl_estimate(lp, [r1, r2], [0.3, 0.7], est), expected)
    with pytest.raises(ValueError, match="one weight per reference"):
        Fn.weighted_kl_estimate(lp, [r1, r2], [1.0])
    with pytest.raises(ValueError):
        Fn.weighted_kl_estimate(lp, [], [])


def test_token_rewards_by_hand():
    scores = torch.tensor([2.0, -1.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # kl_coef 0.5: row 0: [-0.05, -0.1, -0.15 + 2]; row 1: [-0.2 - 1, 0, 0]; row 2 (empty): 0
    expected = torch.tensor([[-0.05, -0.1, 1.85], [-1.2, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(Fn.token_rewards(scores, kl, 0.5, mask), expected)
    torch.testing.assert_close(Fn.token_rewards(scores, kl, 0.5, mask.bool()), expected)


# --------------------------------------------------------------------------- GAE


def test_gae_three_steps_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 9.0]])  # last column is padding
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # gamma 1, lam 0.5; value after the last real token is 0
    # t=2: delta = 1 + 0 - 0.5 = 0.5;      A2 = 0.5
    # t=1: delta = 0 + 0.5 - 0.5 = 0;      A1 = 0 + 0.5 * 0.5 = 0.25
    # t=0: delta = 0;                      A0 = 0.5 * 0.25 = 0.125
    # returns = A + V = [0.625, 0.75, 1.0]
    adv, ret = Fn.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.125, 0.25, 0.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.625, 0.75, 1.0, 0.0]]))


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_naive_loop(gamma, lam):
    torch.manual_seed(0)
    T = 9
    mask = ragged_mask([9, 4, 1, 0, 6], T)
    rewards = torch.randn(5, T)
    values = torch.randn(5, T)  # garbage in padded positions must not matter
    adv, ret = Fn.gae(rewards, values, mask, gamma, lam)
    n_adv, n_ret = naive_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, n_adv.float())
    torch.testing.assert_close(ret, n_ret.float())
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


# --------------------------------------------------------------------------- PPO losses


def test_policy_loss_on_policy():
    torch.manual_seed(0)
    lp = torch.randn(3, 5)
    adv = torch.randn(3, 5)
    mask = ragged_mask([5, 3, 2], 5)
    loss, clipfrac, approxkl = Fn.ppo_policy_loss(lp, lp.clone(), adv, mask)
    torch.testing.assert_close(loss, -Fn.masked_mean(adv, mask))
    assert clipfrac.item() == 0.0
    assert approxkl.item() == 0.0


def test_policy_loss_clipping_by_hand():
    # ratios [1.5, 0.5, 1.1, 1.5] (old logprobs 0), advantages [1, -1, 2, -1], eps 0.2
    # tok0: -1*1.5 = -1.5 vs -1*1.2 = -1.2 -> -1.2 (clipped)
    # tok1:  1*0.5 =  0.5 vs  1*0.8 =  0.8 ->  0.8 (clipped)
    # tok2: -2*1.1 = -2.2 vs -2*1.1 = -2.2 -> -2.2 (inside the range)
    # tok3:  1*1.5 =  1.5 vs  1*1.2 =  1.2 ->  1.5 (unclipped is the pessimistic one)
    # loss = (-1.2 + 0.8 - 2.2 + 1.5) / 4 = -0.275; clipfrac = 2/4
    # a 5th, padded token with a wild ratio must be ignored
    ratios = torch.tensor([[1.5, 0.5, 1.1, 1.5, 50.0]])
    lp = ratios.log().requires_grad_()
    old = torch.zeros(1, 5)
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac, approxkl = Fn.ppo_policy_loss(lp, old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-0.275, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)
    logs = [math.log(r) for r in (1.5, 0.5, 1.1, 1.5)]
    assert approxkl.item() == pytest.approx(0.5 * sum(x * x for x in logs) / 4, rel=1e-6)
    assert not clipfrac.requires_grad and not approxkl.requires_grad

    loss.backward()
    # d/dlogp (-A * ratio) / 4 = -A * ratio / 4: tok2 -2.2/4, tok3 1.5/4; clipped tokens get 0
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 0.0, -0.55, 0.375, 0.0]]))


def test_policy_loss_huge_log_ratio_is_finite():
    lp = torch.tensor([[1000.0, -1000.0, 30.0]], requires_grad=True)
    old = torch.zeros(1, 3)
    adv = torch.tensor([[-1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, clipfrac, approxkl = Fn.ppo_policy_loss(lp, old, adv, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(clipfrac) and torch.isfinite(approxkl)
    assert torch.isfinite(lp.grad).all()
    # log-ratios clamped to +-20: approxkl = 0.5 * 400
    assert approxkl.item() == pytest.approx(200.0)


def test_value_loss_by_hand():
    # old 0, eps 0.2
    # tok0: v 0.5 -> clipped 0.2; (0.5-1)^2 = 0.25 vs (0.2-1)^2 = 0.64 -> 0.64 (clipped)
    # tok1: v 0.1 -> clipped 0.1; (0.1+1)^2 = 1.21 both -> 1.21
    # loss = 0.5 * (0.64 + 1.21) / 2 = 0.4625; clipfrac = 1/2; padded tok2 ignored
    values = torch.tensor([[0.5, 0.1, 100.0]], requires_grad=True)
    old = torch.zeros(1, 3)
    returns = torch.tensor([[1.0, -1.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipfrac = Fn.ppo_value_loss(values, old, returns, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.4625)
    assert clipfrac.item() == pytest.approx(0.5)
    loss.backward()
    # tok0 clipped: no gradient; tok1: 0.5 * 2 * (0.1 + 1) / 2 = 0.55
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.55, 0.0]]))


def explained_var(values, returns, mask) -> float:
    """``value/explained_var`` of a trajectory with these values, returns and mask."""
    from salsa_lightning.ppo.rollout import Trajectory, trajectory_metrics

    b, t = returns.shape
    zeros, ids = torch.zeros(b, t), torch.zeros(b, t, dtype=torch.long)
    traj = Trajectory(
        ids[:, :1], torch.ones(b, 1), ids, mask, zeros, [zeros], values, torch.zeros(b),
        zeros, zeros, zeros, returns,
    )  # fmt: skip
    return float(trajectory_metrics(traj, torch.zeros(b), 0.0, 1)["value/explained_var"])


def test_explained_variance():
    torch.manual_seed(0)
    returns = torch.randn(3, 4)
    mask = ragged_mask([4, 2, 3], 4)
    assert explained_var(returns.clone(), returns, mask) == pytest.approx(1.0)
    # constant returns: var 0 -> 0, never nan
    const = torch.full((3, 4), 2.0)
    assert explained_var(torch.randn(3, 4), const, mask) == 0.0
    # predicting the mean explains nothing
    mean = Fn.masked_mean(returns, mask)
    ev = explained_var(torch.full((3, 4), mean.item()), returns, mask)
    assert ev == pytest.approx(0.0, abs=1e-6)
    # returns [1, 2, 3], values [1, 2, 2]: residual [0, 0, 1] var 2/9; var(returns) 2/3
    # 1 - (2/9) / (2/3) = 2/3
    ev = explained_var(
        torch.tensor([[1.0, 2.0, 2.0, 50.0]]),
        torch.tensor([[1.0, 2.0, 3.0, -50.0]]),
        torch.tensor([[1.0, 1.0, 1.0, 0.0]]),
    )
    assert ev == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- reward model


def test_bradley_terry_loss():
    scores = torch.tensor([0.3, -1.0, 2.0])
    assert Fn.bradley_terry_loss(scores, scores.clone()).item() == pytest.approx(math.log(2))
    chosen, rejected = torch.tensor([2.0]), torch.tensor([1.0])
    # diff 1, margin 0.5 -> -log sigmoid(0.5) = log(1 + e^-0.5)
    expected = math.log1p(math.exp(-0.5))
    assert Fn.bradley_terry_loss(chosen, rejected, 0.5).item() == pytest.approx(expected)
    assert Fn.bradley_terry_loss(chosen, rejected, torch.tensor([0.5])).item() == pytest.approx(
        expected
    )
    # margin 1 -> diff 0 -> log 2; no margin -> log(1 + e^-1)
    assert Fn.bradley_terry_loss(chosen, rejected, 1.0).item() == pytest.approx(math.log(2))
    assert Fn.bradley_terry_loss(chosen, rejected).item() == pytest.approx(math.log1p(math.exp(-1)))


def test_reward_centering_loss():
    # sums [0, 3] -> squares [0, 9] -> mean 4.5
    loss = Fn.reward_centering_loss(torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 1.0]))
    assert loss.item() == pytest.approx(4.5)


# --------------------------------------------------------------------------- generated tokens

EOS, PAD = 2, 0
TOKENS = torch.tensor(
    [
        [5, 6, 2, 7, 2],  # EOS at 2, a second EOS later
        [2, 5, 5, 5, 5],  # EOS at position 0
        [5, 6, 7, 8, 9],  # no EOS
        [5, 5, 5, 5, 2],  # EOS at the very end
    ]
)


def test_response_mask_by_hand():
    expected = torch.tensor(
        [
            [1.0, 1.0, 1.0, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0, 0.0],
            [1.0, 1.0, 1.0, 1.0, 1.0],
            [1.0, 1.0, 1.0, 1.0, 1.0],
        ]
    )
    mask = Fn.response_mask(TOKENS, EOS)
    assert mask.dtype == torch.float32
    assert torch.equal(mask, expected)


def test_truncate_after_eos_by_hand():
    tokens, mask = Fn.truncate_after_eos(TOKENS, EOS, PAD)
    expected = torch.tensor(
        [
            [5, 6, 2, 0, 0],
            [2, 0, 0, 0, 0],
            [5, 6, 7, 8, 9],
            [5, 5, 5, 5, 2],
        ]
    )
    assert torch.equal(tokens, expected)
    assert tokens.dtype == TOKENS.dtype
    assert torch.equal(mask, Fn.response_mask(TOKENS, EOS))


# --------------------------------------------------------------------------- KL controller


def test_adaptive_kl_controller():
    # error clipped to +-0.2: 0.1 * (1 +- 0.2 * 256 / 10000) = 0.1 * (1 +- 0.00512)
    up = Fn.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    up.update(12.0, n_steps=256)  # 12/6 - 1 = 1 -> clipped to 0.2
    assert up.value == pytest.approx(0.1 * 1.00512)

    down = Fn.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    down.update(0.0, n_steps=256)  # 0/6 - 1 = -1 -> clipped to -0.2
    assert down.value == pytest.approx(0.1 * 0.99488)

    small = Fn.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    small.update(torch.tensor(6.6), n_steps=256)  # 6.6/6 - 1 = 0.1, inside the clip
    assert small.value == pytest.approx(0.1 * (1 + 0.1 * 256 / 10000))

    fixed = Fn.AdaptiveKLController(0.1)
    fixed.update(100.0, n_steps=256)
    assert fixed.value == 0.1

    restored = Fn.AdaptiveKLController(0.5, target=6.0)
    restored.load_state_dict(up.state_dict())
    assert restored.value == up.value
    restored.update(12.0, 256)
    up.update(12.0, 256)
    assert restored.value == up.value

    with pytest.raises(ValueError):
        Fn.AdaptiveKLController(0.1, target=0.0)
    with pytest.raises(ValueError):
        Fn.AdaptiveKLController(0.1, target=1.0, horizon=0)


# --------------------------------------------------------------------------- evaluation


def test_bootstrap_mean_ci():
    values = torch.arange(100, dtype=torch.float32)
    mean, low, high = Fn.bootstrap_mean_ci(values, n_resamples=500, seed=3)
    assert mean == pytest.approx(49.5)
    assert low < mean < high
    assert (mean, low, high) == Fn.bootstrap_mean_ci(values, n_resamples=500, seed=3)
    assert Fn.bootstrap_mean_ci(values, n_resamples=500, seed=4) != (mean, low, high)
    _, low99, high99 = Fn.bootstrap_mean_ci(values, n_resamples=500, confidence=0.99, seed=3)
    assert low99 <= low and high99 >= high
    assert Fn.bootstrap_mean_ci(torch.tensor([2.0]), n_resamples=10) == (2.0, 2.0, 2.0)


def test_win_rate_with_ties():
    wins = Fn.win_rate(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 2.0, 4.0, 4.0]))
    torch.testing.assert_close(wins, torch.tensor([1.0, 0.5, 0.0, 0.5]))
    assert wins.mean().item() == pytest.approx(0.5)


# --------------------------------------------------------------------------- group estimators


def random_groups(k, n_groups=4, seed=0):
    """float64 scores, ``n_groups`` groups of ``k``, one group with all-equal scores."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_groups * k, generator=gen, dtype=torch.float64) * 3
    scores[:k] = 1.5  # dyadic, so the group mean is exact
    return scores


def naive_group_advantages(scores, k, scale_by_std=True, eps=1e-4):
    """GRPO per group with the statistics module: (r - mean) / (stdev + eps)."""
    out = []
    for g in range(len(scores) // k):
        group = [float(x) for x in scores[g * k : (g + 1) * k]]
        mean = statistics.fmean(group)
        std = statistics.stdev(group) if k > 1 else 0.0
        out += [(r - mean) / (std + eps) if scale_by_std else r - mean for r in group]
    return torch.tensor(out, dtype=torch.float64)


def naive_leave_one_out(scores, k):
    """RLOO as an explicit loop: r_i minus the mean of r_j over j != i in i's group."""
    out = []
    for i in range(len(scores)):
        g = i // k
        others = [float(scores[j]) for j in range(g * k, (g + 1) * k) if j != i]
        out.append(float(scores[i]) - sum(others) / len(others))
    return torch.tensor(out, dtype=torch.float64)


def naive_group_centred(scores, k):
    out = []
    for g in range(len(scores) // k):
        group = [float(x) for x in scores[g * k : (g + 1) * k]]
        out += [r - sum(group) / k for r in group]
    return torch.tensor(out, dtype=torch.float64)


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 16.0], dtype=torch.float64)
    # group 0: mean 2, deviations [-1, 0, 1], Bessel std sqrt(2 / 2) = 1
    # group 1: mean 12, deviations [-2, -2, 4], Bessel std sqrt((4 + 4 + 16) / 2) = sqrt(12)
    # GRPO (eps 1e-4): deviations / (std + 1e-4); Dr. GRPO: the deviations themselves
    s12 = math.sqrt(12)
    expected = torch.tensor(
        [-1 / 1.0001, 0.0, 1 / 1.0001, -2 / (s12 + 1e-4), -2 / (s12 + 1e-4), 4 / (s12 + 1e-4)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(Fn.group_advantages(scores, 3), expected)
    unscaled = torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(Fn.group_advantages(scores, 3, scale_by_std=False), unscaled)
    # eps 0: group 1 becomes [-2, -2, 4] / sqrt(12) exactly
    torch.testing.assert_close(
        Fn.group_advantages(scores, 3, eps=0.0)[3:], unscaled[3:] / s12, rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("k", [2, 3, 5, 8])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_match_statistics_stdev(k, scale_by_std):
    scores = random_groups(k, seed=k)
    out = Fn.group_advantages(scores, k, scale_by_std=scale_by_std)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, naive_group_advantages(scores, k, scale_by_std))


def test_group_advantages_zero_for_one_sample_or_equal_scores():
    torch.manual_seed(0)
    # k = 1: every sample is its own group, its score is its group's mean
    assert torch.equal(Fn.group_advantages(torch.randn(5), 1), torch.zeros(5))
    # all-equal groups (dyadic values: means are exact) next to a varied one
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5, -3.25, -3.25, -3.25, -3.25, 0.0, 1.0, 2.0, 3.0])
    for scale_by_std in (True, False):
        out = Fn.group_advantages(scores, 4, scale_by_std=scale_by_std)
        assert torch.equal(out[:8], torch.zeros(8))
        assert (out[8:] != 0).all()


@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_group_advantages_equal_non_dyadic_scores_are_zero(eps):
    # The group mean of seven float32 0.1s is one ulp off: without the tie check the residual
    # (~7e-9) over the std (~8e-9) + eps would give -7.4e-5 (eps 1e-4) and -0.93 (eps 0).
    scores = torch.full((7,), 0.1)
    assert torch.equal(Fn.group_advantages(scores, 7, eps=eps), torch.zeros(7))


def test_leave_one_out_by_hand():
    # group [1, 2, 6]: 1 - (2 + 6) / 2 = -3; 2 - (1 + 6) / 2 = -1.5; 6 - (1 + 2) / 2 = 4.5
    # group [3, 7] with k = 2: 3 - 7 = -4; 7 - 3 = 4
    scores = torch.tensor([1.0, 2.0, 6.0])
    torch.testing.assert_close(
        Fn.leave_one_out_advantages(scores, 3), torch.tensor([-3.0, -1.5, 4.5])
    )
    torch.testing.assert_close(
        Fn.leave_one_out_advantages(torch.tensor([3.0, 7.0]), 2), torch.tensor([-4.0, 4.0])
    )


def test_group_centred_by_hand():
    # groups [1, 2, 6] (mean 3) and [4, 4, 10] (mean 6): [-2, -1, 3, -2, -2, 4]
    scores = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 10.0])
    expected = torch.tensor([-2.0, -1.0, 3.0, -2.0, -2.0, 4.0])
    torch.testing.assert_close(Fn.group_centred(scores, 3), expected)


@pytest.mark.parametrize("k", [2, 3, 4, 7])
def test_leave_one_out_and_group_centred_match_loops(k):
    scores = random_groups(k, seed=10 + k)
    torch.testing.assert_close(
        Fn.leave_one_out_advantages(scores, k), naive_leave_one_out(scores, k)
    )
    torch.testing.assert_close(Fn.group_centred(scores, k), naive_group_centred(scores, k))


@pytest.mark.parametrize("k", [2, 3, 6])
def test_leave_one_out_is_k_over_k_minus_one_times_centred(k):
    # r_i - (S - r_i) / (k - 1) = (k r_i - S) / (k - 1) = k / (k - 1) * (r_i - S / k)
    scores = random_groups(k, seed=20 + k)
    torch.testing.assert_close(
        Fn.leave_one_out_advantages(scores, k), k / (k - 1) * Fn.group_centred(scores, k)
    )


@pytest.mark.parametrize(
    "estimator",
    [
        lambda s, k: Fn.group_advantages(s, k, scale_by_std=False),
        Fn.leave_one_out_advantages,
        Fn.group_centred,
    ],
    ids=["dr_grpo", "rloo", "group_centred"],
)
@pytest.mark.parametrize("k", [2, 3, 5])
def test_group_advantages_sum_to_zero_per_group(estimator, k):
    scores = random_groups(k, n_groups=5, seed=30 + k)
    sums = estimator(scores, k).reshape(-1, k).sum(dim=1)
    torch.testing.assert_close(sums, torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-12)
    # and not trivially: the advantages themselves are not all zero
    assert estimator(scores, k).abs().max() > 0.1


def test_group_estimators_reject_bad_group_sizes():
    five = torch.zeros(5)
    for fn in (Fn.group_advantages, Fn.leave_one_out_advantages, Fn.group_centred):
        with pytest.raises(SalsaError, match="5 samples do not split into groups of 2"):
            fn(five, 2)
    for fn in (Fn.group_advantages, Fn.group_centred):
        with pytest.raises(SalsaError, match="groups of 0"):
            fn(torch.zeros(4), 0)
    with pytest.raises(SalsaError, match="needs k >= 2 samples per prompt, got 1"):
        Fn.leave_one_out_advantages(torch.zeros(4), 1)


# --------------------------------------------------------------------------- REINFORCE returns


def naive_returns_to_go(rewards, mask, gamma):
    """Per-row loop over the real tokens only."""
    B, T = rewards.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        running = 0.0
        for t in reversed(range(int(mask[b].sum()))):
            running = float(rewards[b, t]) + gamma * running
            out[b, t] = running
    return out


def test_returns_to_go_by_hand():
    nan, inf = float("nan"), float("inf")
    rewards = torch.tensor([[1.0, 2.0, 3.0, 99.0], [0.5, 4.0, nan, inf]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    # gamma 0.5; row 0: G2 = 3, G1 = 2 + 0.5 * 3 = 3.5, G0 = 1 + 0.5 * 3.5 = 2.75
    # row 1: G1 = 4, G0 = 0.5 + 0.5 * 4 = 2.5; padding (99, nan, inf) counts as 0
    expected = torch.tensor([[2.75, 3.5, 3.0, 0.0], [2.5, 4.0, 0.0, 0.0]])
    torch.testing.assert_close(Fn.returns_to_go(rewards, mask, gamma=0.5), expected)
    torch.testing.assert_close(Fn.returns_to_go(rewards, mask.bool(), gamma=0.5), expected)


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_returns_to_go_matches_naive_loop(gamma):
    torch.manual_seed(0)
    T = 8
    mask = ragged_mask([8, 5, 1, 0, 3], T).double()
    rewards = torch.randn(5, T, dtype=torch.float64)  # garbage in padded positions
    out = Fn.returns_to_go(rewards, mask, gamma)
    torch.testing.assert_close(out, naive_returns_to_go(rewards, mask, gamma))


def test_returns_to_go_gamma_one_is_reversed_cumsum_ignoring_padding():
    torch.manual_seed(0)
    mask = ragged_mask([6, 2, 4], 6).double()
    clean = torch.randn(3, 6, dtype=torch.float64) * mask
    expected = clean.flip(-1).cumsum(-1).flip(-1) * mask
    # padding: 0 + 4 + 2 = 6 positions of inf, nan, -inf, 1e300, ...
    garbage = [float("inf"), float("nan"), -float("inf"), 1e300, float("nan"), float("inf")]
    dirty = clean.clone()
    dirty[mask == 0] = torch.tensor(garbage, dtype=torch.float64)
    out = Fn.returns_to_go(dirty, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected)


def test_per_token_by_hand_and_zero_outside_mask():
    values = torch.tensor([2.0, -1.0, 0.5])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    expected = torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    torch.testing.assert_close(Fn.per_token(values, mask), expected)
    torch.testing.assert_close(Fn.per_token(values, mask.bool()), expected)

    torch.manual_seed(0)
    values = torch.randn(4, dtype=torch.float64)
    mask = ragged_mask([5, 2, 0, 3], 5)
    out = Fn.per_token(values, mask)
    assert out.dtype == torch.float64
    for b in range(4):
        for t in range(5):
            assert out[b, t].item() == (values[b].item() if mask[b, t] else 0.0)


# --------------------------------------------------------------------------- shaped scores


def test_shaped_scores_normalise_then_penalise_then_clip():
    raw = torch.tensor([3.0, 1.0, 7.0, -5.0])
    has_eos = torch.tensor([True, False, True, False])
    stats = {"mean": 1.0, "std": 2.0}
    # normalised (raw - 1) / 2 = [1, 0, 3, -3]; penalty 1 without EOS: [1, -1, 3, -4]
    # clipped to +-2: [1, -1, 2, -2]
    # the order matters: clip before the penalty gives [1, -1, 2, -3]; the penalty before
    # normalising gives (raw - [0, 1, 0, 1] - 1) / 2 = [1, -0.5, 3, -3.5] -> [1, -0.5, 2, -2]
    out = Fn.shaped_scores(raw, has_eos, stats, missing_eos_penalty=1.0, clip=2.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0, 2.0, -2.0]))
    # each step alone
    torch.testing.assert_close(
        Fn.shaped_scores(raw, has_eos, stats), torch.tensor([1.0, 0.0, 3.0, -3.0])
    )
    torch.testing.assert_close(
        Fn.shaped_scores(raw, has_eos, missing_eos_penalty=1.0), torch.tensor([3.0, 0.0, 7.0, -6.0])
    )
    torch.testing.assert_close(
        Fn.shaped_scores(raw, has_eos, clip=2.0), torch.tensor([2.0, 1.0, 2.0, -2.0])
    )


def test_shaped_scores_defaults_leave_scores_unchanged():
    torch.manual_seed(0)
    raw = torch.randn(6)
    has_eos = torch.tensor([True, False] * 3)
    assert torch.equal(Fn.shaped_scores(raw, has_eos), raw)
    # a degenerate std is floored at 1e-6 instead of dividing by zero
    out = Fn.shaped_scores(torch.tensor([1.0, 1.000001]), has_eos[:2], {"mean": 1.0, "std": 0.0})
    assert torch.isfinite(out).all()
    assert out[0].item() == 0.0


# --------------------------------------------------------------------------- loss aggregation


def naive_aggregate(per_tok, mask, mode, normalizer=None):
    rows = []
    for b in range(per_tok.shape[0]):
        rows.append([float(per_tok[b, t]) for t in range(per_tok.shape[1]) if mask[b, t]])
    if mode == "token_mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if mode == "sequence_mean":
        return sum(sum(r) / max(len(r), 1) for r in rows) / len(rows)
    return sum(sum(r) for r in rows) / (len(rows) * normalizer)


def test_aggregate_by_hand():
    per_tok = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, float("inf"), float("nan"), 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    # long answer: 4 tokens of loss 1; short answer: 1 token of loss 5; padding ignored
    # token_mean (4 + 5) / 5 = 1.8; sequence_mean (1 + 5) / 2 = 3; constant 9 / (2 * 4) = 1.125
    assert Fn.aggregate(per_tok, mask).item() == pytest.approx(1.8)
    assert Fn.aggregate(per_tok, mask, "token_mean").item() == pytest.approx(1.8)
    assert Fn.aggregate(per_tok, mask, "sequence_mean").item() == pytest.approx(3.0)
    assert Fn.aggregate(per_tok, mask, "constant", normalizer=4).item() == pytest.approx(1.125)
    # constant divides by B x normalizer, not by the token count: normalizer 10 -> 9 / 20
    assert Fn.aggregate(per_tok, mask, "constant", normalizer=10).item() == pytest.approx(0.45)


def test_aggregate_sequence_mean_weighs_answers_equally_token_mean_by_length():
    # a long answer of L tokens with loss 1 and a short one of 1 token with loss 5
    token_means = []
    for L in (1, 3, 7):
        per_tok = torch.tensor([[1.0] * L, [5.0] + [0.0] * (L - 1)])
        mask = ragged_mask([L, 1], L)
        # sequence_mean is (1 + 5) / 2 whatever L; token_mean is (L + 5) / (L + 1)
        assert Fn.aggregate(per_tok, mask, "sequence_mean").item() == pytest.approx(3.0)
        token_means.append(Fn.aggregate(per_tok, mask, "token_mean").item())
    assert token_means == pytest.approx([3.0, 2.0, 1.5])


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "constant"])
def test_aggregate_matches_naive_loop(mode):
    torch.manual_seed(0)
    mask = ragged_mask([7, 2, 5, 1], 7)
    per_tok = torch.randn(4, 7, dtype=torch.float64)
    out = Fn.aggregate(per_tok, mask, mode, normalizer=7 if mode == "constant" else None)
    assert out.shape == ()
    assert out.item() == pytest.approx(naive_aggregate(per_tok, mask, mode, 7), rel=1e-12)


def test_aggregate_rejects_unknown_mode_and_bad_normalizer():
    x, mask = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(SalsaError, match="unknown loss aggregation 'mean'.*token_mean"):
        Fn.aggregate(x, mask, "mean")
    for normalizer in (None, 0, -3.0):
        with pytest.raises(SalsaError, match="'constant' needs a positive normalizer"):
            Fn.aggregate(x, mask, "constant", normalizer)
    with pytest.raises(SalsaError, match="unknown loss aggregation"):
        Fn.ppo_policy_loss(x, x, x, mask, aggregation="sum")
    with pytest.raises(SalsaError, match="positive normalizer"):
        Fn.ppo_policy_loss(x, x, x, mask, aggregation="constant")


def previous_ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2):
    """The policy loss before aggregation became an argument: a plain masked mean."""
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return Fn.masked_mean(torch.maximum(unclipped, clipped), mask)


def test_policy_loss_default_aggregation_is_previous_masked_mean():
    torch.manual_seed(0)
    lp = (torch.randn(4, 6) * 0.3).requires_grad_()
    old = torch.randn(4, 6) * 0.3
    adv = torch.randn(4, 6)
    mask = ragged_mask([6, 3, 1, 4], 6)
    loss, _, _ = Fn.ppo_policy_loss(lp, old, adv, mask)
    loss.backward()
    grad = lp.grad.clone()
    lp.grad = None
    previous = previous_ppo_policy_loss(lp, old, adv, mask)
    previous.backward()
    assert torch.equal(loss, previous)
    assert torch.equal(grad, lp.grad)
    explicit, _, _ = Fn.ppo_policy_loss(lp, old, adv, mask, aggregation="token_mean")
    assert torch.equal(explicit, previous)


def test_policy_loss_aggregations_by_hand():
    # on-policy (ratio 1): the per-token loss is -A; row 0 has 3 tokens of A = 1, row 1 one
    # token of A = 4. token_mean -(1 + 1 + 1 + 4) / 4 = -1.75; sequence_mean -(1 + 4) / 2 = -2.5;
    # constant with normalizer 3: -7 / (2 * 3) = -7/6
    lp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, 1.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    expected = {"token_mean": -1.75, "sequence_mean": -2.5, "constant": -7 / 6}
    for mode, value in expected.items():
        loss, clipfrac, approxkl = Fn.ppo_policy_loss(
            lp, torch.zeros(2, 3), adv, mask, aggregation=mode, normalizer=3
        )
        assert loss.item() == pytest.approx(value), mode
        assert clipfrac.item() == 0.0 and approxkl.item() == 0.0
    # the last (constant) loss: d/dlogp = -A * ratio / (B * normalizer) = -A / 6 on real tokens
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [-4 / 6, 0, 0]]))


# --------------------------------------------------------------------------- reference KL


def test_reference_kl_one_reference_is_kl_estimate():
    torch.manual_seed(0)
    lp, ref = torch.randn(2, 3, 5)
    for est in Fn.KL_ESTIMATORS:
        # one model (a checkpoint or a soup): the soup's mixing weights do not scale the KL
        for weights in ([1.0], [0.3, 0.7]):
            assert torch.equal(
                Fn.reference_kl(lp, [ref], weights, est), Fn.kl_estimate(lp, ref, est)
            )


def test_reference_kl_several_references_is_weighted_sum():
    lp = torch.tensor([[0.0, -1.0]])
    refs = [torch.tensor([[-1.0, 0.0]]), torch.tensor([[0.0, 0.0]])]
    # k1 = logprobs - ref: [1, -1] and [0, -1]; 0.5 * [1, -1] + 2 * [0, -1] = [0.5, -2.5]
    torch.testing.assert_close(Fn.reference_kl(lp, refs, [0.5, 2.0]), torch.tensor([[0.5, -2.5]]))

    torch.manual_seed(0)
    lp, r1, r2, r3 = torch.randn(4, 3, 5)
    for est in Fn.KL_ESTIMATORS:
        assert torch.equal(
            Fn.reference_kl(lp, [r1, r2, r3], [0.2, 0.3, 0.5], est),
            Fn.weighted_kl_estimate(lp, [r1, r2, r3], [0.2, 0.3, 0.5], est),
        )
    with pytest.raises(SalsaError, match="one weight per reference"):
        Fn.reference_kl(lp, [r1, r2], [1.0])
    with pytest.raises(SalsaError, match="at least one reference"):
        Fn.reference_kl(lp, [], [])


def test_per_token_keeps_padding_zero_for_non_finite_values():
    out = Fn.per_token(torch.tensor([float("inf"), 1.0]), torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert torch.equal(out, torch.tensor([[float("inf"), 0.0], [1.0, 1.0]]))


def test_shaped_scores_read_an_integer_eos_flag_as_a_bool():
    # has_eos [1, 0]: only the second score is penalised (a bitwise ~ on ints would add to both)
    out = Fn.shaped_scores(torch.tensor([1.0, 2.0]), torch.tensor([1, 0]), None, 1.0)
    assert torch.equal(out, torch.tensor([1.0, 1.0]))


def test_whitening_with_an_all_sum_uses_the_whole_batch():
    """Two ranks holding the same half of a batch: summing their statistics gives the whitening
    of the whole (doubled) batch, and the identity all_sum is the plain whitening."""
    torch.manual_seed(0)
    x, mask = torch.randn(3, 5), ragged_mask([5, 2, 4], 5)
    whole = Fn.masked_whiten(torch.cat([x, x]), torch.cat([mask, mask]))[:3]
    torch.testing.assert_close(Fn.masked_whiten(x, mask, all_sum=lambda t: 2 * t), whole)
    assert torch.equal(Fn.masked_whiten(x, mask, all_sum=lambda t: t), Fn.masked_whiten(x, mask))
    assert not torch.allclose(Fn.masked_whiten(x, mask), whole)  # the two do differ


def test_seeds_bootstrap_ci_matches_a_naive_resampling_loop():
    """Resampling seeds and prompts (the same prompts for every seed), against a loop."""
    torch.manual_seed(0)
    values = torch.rand(3, 7)
    mean, low, high = Fn.seeds_bootstrap_ci(values, n_resamples=200, seed=5)
    g = torch.Generator().manual_seed(5)
    seeds, prompts = (
        torch.randint(0, 3, (200, 3), generator=g),
        torch.randint(0, 7, (200, 7), generator=g),
    )
    means = torch.stack([values.double()[seeds[r]][:, prompts[r]].mean() for r in range(200)])
    want = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert mean == pytest.approx(float(values.mean()))
    assert (low, high) == pytest.approx((float(want[0]), float(want[1])))
    assert low < mean < high


def test_seeds_bootstrap_ci_of_one_seed_is_the_prompt_bootstrap_width():
    """With one seed only the prompts vary; identical seeds add no width."""
    values = torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0]])
    _, low1, high1 = Fn.seeds_bootstrap_ci(values)
    _, low3, high3 = Fn.seeds_bootstrap_ci(values.expand(3, -1))
    assert high1 - low1 > 0 and (high3 - low3) <= (high1 - low1) + 1e-9
    with pytest.raises(Exception, match=r"needs \[seeds, prompts\]"):
        Fn.seeds_bootstrap_ci(torch.ones(4))


def test_grouped_rate_ci_matches_a_naive_resampling_loop():
    """The pooled rate sum(hits) / sum(counts), groups resampled whole, against a loop."""
    hits, counts = torch.tensor([3.0, 0.0, 5.0, 1.0]), torch.tensor([4.0, 2.0, 6.0, 1.0])
    rate, low, high = Fn.grouped_rate_ci(hits, counts, n_resamples=300, seed=2)
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 4, (300, 4), generator=g)
    rates = torch.stack([hits[i].sum() / counts[i].sum() for i in idx]).double()
    want = torch.quantile(rates, torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert rate == pytest.approx(9 / 13)
    assert (low, high) == pytest.approx((float(want[0]), float(want[1])))


def test_grouped_rate_ci_is_wider_than_the_pair_bootstrap_when_groups_agree_within():
    """40 prompts of 6 pairs each, every prompt all right or all wrong: resampling pairs
    treats 240 outcomes as independent, resampling prompts sees 40; the grouped interval is
    about sqrt(6) times wider. Prompts of no pairs are resampled but add no outcome."""
    right = (torch.arange(40) % 4 != 0).float()  # 30 prompts right, 10 wrong
    hits, counts = 6 * right, torch.full((40,), 6.0)
    _, low_g, high_g = Fn.grouped_rate_ci(
        torch.cat([hits, torch.zeros(5)]), torch.cat([counts, torch.zeros(5)])
    )
    _, low_p, high_p = Fn.bootstrap_mean_ci(right.repeat_interleave(6))
    assert 2.0 < (high_g - low_g) / (high_p - low_p) < 3.0
    with pytest.raises(Exception, match="needs"):
        Fn.grouped_rate_ci(torch.zeros(3), torch.zeros(3))


def test_metric_window_means_each_metric_over_the_rollouts_that_reported_it():
    from salsa_lightning.ppo.rollout import MetricWindow

    window = MetricWindow()
    window.add({"a": torch.tensor(1.0), "b": 2.0})
    window.add({"a": 4.0})  # b not reported this rollout (a skipped group count, say)
    window.add({"a": 7.0, "b": 5.0})
    assert window.last == {"a": 7.0, "b": 5.0}
    saved = window.state_dict()
    assert window.pop_means() == {"a": 4.0, "b": 3.5}  # (1 + 4 + 7) / 3, (2 + 5) / 2
    assert window.pop_means() == {}  # the next window starts empty
    window.add({"a": 1.0})
    window.load_state_dict(saved)  # a resumed run continues the saved window
    window.add({"a": 8.0})
    assert window.pop_means() == {"a": 5.0, "b": 3.5}  # (1 + 4 + 7 + 8) / 4
