"""Sampling and response log-probs (salsa_lightning.generation) on the shipped tiny model."""

from __future__ import annotations

import copy
import inspect
import json
import os
import sys
import warnings
import weakref
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from conftest import BASE, KILLED, free_port, run_rerun_if_killed
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from salsa_lightning.data import left_padded_prompts
from salsa_lightning.errors import SalsaError
from salsa_lightning.functional import response_mask
from salsa_lightning.generation import (
    STATIC_PROMPT_BUCKET,
    GenerationSettings,
    NonFiniteLogits,
    StaticDecoder,
    next_tokens,
    output_layer,
    position_ids,
    response_logprobs,
    sample,
    score_response,
    static_decoder,
    static_failed,
    tied_embedding,
    use_static_cache,
    warpers,
)

PROMPTS = ["Reverse: a b c", "Add: 12 + 7", "Sort: 3 1 2 9 4", "Count a in: a b a"]


def setup():
    tok = AutoTokenizer.from_pretrained(BASE)
    model = AutoModelForCausalLM.from_pretrained(BASE).eval()
    query, mask = left_padded_prompts(tok, PROMPTS)
    return tok, model, query, mask


def test_stop_at_eos_masks_after_the_first_eos_and_off_decodes_every_token():
    tok, model, query, mask = setup()
    torch.manual_seed(0)
    response, rmask = sample(model, tok, query, mask, GenerationSettings(max_new_tokens=12))
    assert torch.equal(rmask, response_mask(response, tok.eos_token_id))
    after = rmask == 0
    assert (response[after] == tok.pad_token_id).all()
    torch.manual_seed(0)
    settings = GenerationSettings(max_new_tokens=12, stop_at_eos=False)
    full, full_mask = sample(model, tok, query, mask, settings)
    assert full.shape == (len(PROMPTS), 12) and bool(full_mask.all())
    assert not bool(rmask.all())  # the stopping run did stop some responses early


def test_response_logprobs_match_a_full_forward():
    tok, model, query, mask = setup()
    torch.manual_seed(0)
    response, rmask = sample(model, tok, query, mask, GenerationSettings(max_new_tokens=6))
    seq = torch.cat([query, response], 1)
    attn = torch.cat([mask, rmask.long()], 1)
    fast = response_logprobs(model, seq, attn, response)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=seq, attention_mask=attn, position_ids=positions).logits
    naive = torch.log_softmax(logits[:, query.shape[1] - 1 : -1].float(), -1)
    naive = naive.gather(-1, response[..., None]).squeeze(-1)
    assert torch.allclose(fast, naive, atol=1e-5)


def decode_both_caches(model, tok, query, mask, device, **settings):
    model, query, mask = model.to(device), query.to(device), mask.to(device)
    out = {}
    for cache in ("dynamic", "static"):
        torch.manual_seed(0)
        kwargs = {"max_new_tokens": 10, "do_sample": False, **settings}
        out[cache] = sample(model, tok, query, mask, GenerationSettings(cache=cache, **kwargs))
    return out


@pytest.mark.parametrize("settings", [{}, {"stop_at_eos": False}, {"max_new_tokens": 24}])
def test_static_decoder_decodes_the_same_tokens_as_generate(settings):
    """The static cache is an optimisation only: greedy, the tokens, the EOS truncation and the
    response length are generate's."""
    tok, model, query, mask = setup()
    out = decode_both_caches(model, tok, query, mask, "cpu", **settings)
    assert torch.equal(out["static"][0], out["dynamic"][0])
    assert torch.equal(out["static"][1], out["dynamic"][1])


def test_static_decoder_samples_generates_distribution():
    """Sampled, the StaticDecoder draws other tokens than generate under one seed (inverse
    transform against multinomial) from the same distribution: over 600 draws of the first
    response token of each prompt at temperature 0.7 and top-p 0.8, each token's frequency is
    within 0.06 of its probability under the model's warped logits, and no token outside the
    nucleus is drawn."""
    tok, model, query, mask = setup()
    settings = GenerationSettings(max_new_tokens=1, temperature=0.7, top_p=0.8, cache="static")
    n = 600
    torch.manual_seed(0)
    draws = torch.stack([sample(model, tok, query, mask, settings)[0][:, 0] for _ in range(n)])
    with torch.no_grad():
        logits = model(input_ids=query, attention_mask=mask, position_ids=position_ids(mask))
    probs = warpers(settings)(None, logits.logits[:, -1].float()).softmax(-1)
    freq = torch.zeros_like(probs).scatter_add_(1, draws.T, torch.ones(draws.T.shape)) / n
    assert (freq[probs == 0] == 0).all()
    assert (freq - probs).abs().max() < 0.06


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_decoding_stops_on_non_finite_logits(cache):
    """Non-finite logits while decoding raise NonFiniteLogits (a RuntimeError; SALSA's rollout
    turns it into its diverged-run error), from the StaticDecoder's check or generate's
    multinomial, and do not switch the model to generate for good."""
    tok, model, query, mask = setup()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    settings = GenerationSettings(max_new_tokens=4, cache=cache)
    with pytest.raises(NonFiniteLogits, match="non-finite"):
        sample(model, tok, query, mask, settings)
    assert static_failed(model) is None


@pytest.mark.slow  # compiling the step takes 10 to 20 s on the 2-core CPU
def test_compiled_static_decoder_on_the_cpu_decodes_the_same_tokens_as_generate():
    """``generation.compile`` on the CPU: ``cache: auto`` now decodes with the StaticDecoder,
    its prefill and step compiled (not the eager forward), and greedy decoding gives generate's
    tokens and response mask over two rollouts (the second replays both, compiling nothing)."""
    tok, model, query, mask = setup()
    compiled = GenerationSettings(max_new_tokens=10, do_sample=False, compile=True)
    dynamic = GenerationSettings(max_new_tokens=10, do_sample=False, cache="dynamic")
    for rollout in range(2):
        with torch._dynamo.config.patch(error_on_recompile=rollout > 0):
            fast = sample(model, tok, query, mask, compiled)
        assert static_failed(model) is None
        slow = sample(model, tok, query, mask, dynamic)
        assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    decoder = static_decoder(model, len(PROMPTS), 10, compile=True)
    assert decoder.step != decoder.advance  # the compiled step decoded (`is not`: always true)
    assert decoder.prefill != decoder.forward
    assert list(model.__dict__["_salsa_static_decoders"]) == [(len(PROMPTS), 10, True)]
    # Sampled, the compiled step (forward, warpers and inverse transform fused) draws the eager
    # step's tokens from the same noise.
    warped = GenerationSettings(max_new_tokens=10, temperature=0.7, top_p=0.8)
    eager = StaticDecoder(model, len(PROMPTS), 10, compile=False)
    draws = []
    for step in (decoder, eager):
        torch.manual_seed(3)
        draws.append(step(query, mask, warped, tok.eos_token_id, tok.pad_token_id))
    assert torch.equal(*draws)


def skipping_guards() -> bool:
    return torch._dynamo.eval_frame._stance.skip_guard_eval_unsafe


def test_a_compiled_cpu_step_skips_its_guards_after_a_rollouts_first_token_and_only_there():
    """The compiled CPU step checks its guards at each rollout's first token and skips them at
    the later ones, under one stance that ends with the rollout, also when a step fails; the
    eager step has no guards to skip. (The step is wrapped to record the stance: nothing is
    compiled here.)"""
    tok, model, _, _ = setup()
    query, mask = left_padded_prompts(tok, PROMPTS[:2])
    settings = GenerationSettings(max_new_tokens=5, do_sample=False)
    eager, compiled = StaticDecoder(model, 2, 5, False), StaticDecoder(model, 2, 5, True)
    for decoder in (eager, compiled):
        decoder._fit(query.shape[1], torch.device("cpu"))
        seen, advance = [], decoder.advance

        def recording(*args, seen=seen, advance=advance):
            seen.append(skipping_guards())
            if len(seen) == 7:  # the second rollout's third step
                raise RuntimeError("a step failed")
            return advance(*args)

        decoder.step = recording if decoder is compiled else decoder.advance
        decoder(query, mask, settings, None, tok.pad_token_id)
        assert not skipping_guards()
        if decoder is compiled:
            assert seen == [False, True, True, True]  # 5 tokens: the prefill's and 4 steps
            with pytest.raises(RuntimeError, match="a step failed"):
                decoder(query, mask, settings, None, tok.pad_token_id)
            assert seen[4:] == [False, True, True] and not skipping_guards()
    assert isinstance(eager.unchecked(), nullcontext)


def test_static_decoder_reuses_its_cache_for_shorter_prompts():
    tok, model, _, _ = setup()
    settings = GenerationSettings(max_new_tokens=6, do_sample=False, cache="static")
    long_q, long_m = left_padded_prompts(tok, [p * 3 for p in PROMPTS])
    short_q, short_m = left_padded_prompts(tok, PROMPTS)
    sample(model, tok, long_q, long_m, settings)
    decoder = static_decoder(model, len(PROMPTS), 6)
    cache = decoder.cache
    assert decoder.prompt_length >= long_q.shape[1]
    assert decoder.prompt_length % STATIC_PROMPT_BUCKET == 0
    static = sample(model, tok, short_q, short_m, settings)
    assert static_decoder(model, len(PROMPTS), 6).cache is cache
    dynamic = sample(
        model,
        tok,
        short_q,
        short_m,
        GenerationSettings(max_new_tokens=6, do_sample=False, cache="dynamic"),
    )
    assert torch.equal(static[0], dynamic[0])


def test_static_decoder_serves_a_smaller_batch_without_a_new_graph():
    """An epoch's last, smaller batch is padded up to the decoder's batch: no second cache or
    compiled graph, and its rows decode as generate decodes them."""
    tok, model, query, mask = setup()
    settings = GenerationSettings(max_new_tokens=10, do_sample=False, cache="static")
    sample(model, tok, query, mask, settings)
    decoder = static_decoder(model, len(PROMPTS), 10)
    small = sample(model, tok, query[1:3], mask[1:3], settings)
    assert static_decoder(model, 2, 10) is decoder
    assert list(model.__dict__["_salsa_static_decoders"]) == [(len(PROMPTS), 10, False)]
    dynamic = sample(
        model,
        tok,
        query[1:3],
        mask[1:3],
        GenerationSettings(**{**vars(settings), "cache": "dynamic"}),
    )
    assert torch.equal(small[0], dynamic[0]) and torch.equal(small[1], dynamic[1])


def test_next_tokens_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    settings = GenerationSettings(top_p=0.75)
    torch.manual_seed(0)
    draws = torch.stack([next_tokens(logits, settings, torch.rand(2)) for _ in range(2000)])
    assert set(draws[:, 0].tolist()) == {0, 1} and set(draws[:, 1].tolist()) == {2, 3}
    assert (draws[:, 0] == 0).float().mean() == pytest.approx(0.5 / 0.8, abs=0.04)
    greedy = GenerationSettings(do_sample=False)
    assert next_tokens(logits, greedy, None).tolist() == [0, 3]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_static_cache_on_gpu_matches_dynamic_decoding():
    tok, model, query, mask = setup()
    out = decode_both_caches(model, tok, query, mask, "cuda")  # fp32: no bf16 argmax ties
    assert static_failed(model) is None  # compiled, not fallen back to generate
    assert torch.equal(out["static"][0], out["dynamic"][0])


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", marks=pytest.mark.slow),  # compiling takes 10 to 20 s here
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            ],
        ),
    ],
)
def test_compiled_step_samples_the_eager_steps_tokens(device):
    """Sampling (temperature 0.7, top-p 0.8, 12 tokens, no EOS stop), the compiled step (on a
    GPU its forward as a CUDA graph, on the CPU the whole step as C++ kernels) draws exactly the
    eager step's tokens under one seed: the noise is drawn outside the graph, so both consume
    the same uniforms in the same order, and replaying the graph overwrites nothing in use."""
    tok, model, query, mask = setup()
    model, query, mask = model.to(device), query.to(device), mask.to(device)
    settings = GenerationSettings(max_new_tokens=12, temperature=0.7, top_p=0.8, stop_at_eos=False)
    decoder = static_decoder(model, len(PROMPTS), 12, compile=device == "cpu")
    out = {}
    for step in ("compiled", "compiled again", "eager"):
        if step == "eager":
            eager = (decoder.step, decoder.logits) == (decoder.advance, decoder.forward)
            assert not eager  # the runs above were compiled
            decoder.step, decoder.logits, decoder.compiled = decoder.advance, decoder.forward, False
        torch.manual_seed(0)
        out[step] = decoder(query, mask, settings, None, tok.pad_token_id)
    assert out["compiled"].shape == (len(PROMPTS), 12)
    assert torch.equal(out["compiled"], out["eager"])
    assert torch.equal(out["compiled again"], out["eager"])
    torch.manual_seed(1)  # another seed, other tokens: the noise does reach the draw
    assert not torch.equal(decoder(query, mask, settings, None, tok.pad_token_id), out["eager"])


def test_cache_setting_is_checked_and_auto_picks_static_only_on_a_gpu_out_of_lockstep():
    with pytest.raises(
        SalsaError, match="generation.cache is 'paged'; choose one of auto, static, dynamic"
    ):
        GenerationSettings(cache="paged")
    with pytest.raises(
        SalsaError, match="generation.gather is 'twice'; choose one of once, per_layer"
    ):
        GenerationSettings(gather="twice")
    assert use_static_cache("auto", torch.device("cuda", 0), lockstep=False)
    assert not use_static_cache("auto", torch.device("cuda", 0), lockstep=True)
    assert not use_static_cache("auto", torch.device("cpu"), lockstep=False)
    assert use_static_cache("static", torch.device("cpu"), lockstep=False)
    assert not use_static_cache("static", torch.device("cuda", 0), lockstep=True)
    assert use_static_cache("auto", torch.device("cpu"), lockstep=False, compile=True)
    assert not use_static_cache("dynamic", torch.device("cpu"), lockstep=False, compile=True)
    assert not use_static_cache("auto", torch.device("cpu"), lockstep=True, compile=True)


def test_a_model_the_static_decoder_cannot_run_falls_back_to_generate():
    """Mamba keeps no attention KV cache: the StaticDecoder fails once, says so, and the model
    decodes with generate from then on (the same tokens as the dynamic path)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("mamba", hidden_size=32, num_hidden_layers=2, vocab_size=100)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    tok = type("Tok", (), {"eos_token_id": 2, "pad_token_id": 0})
    query = torch.randint(3, 100, (2, 5))
    mask = torch.ones_like(query)
    static = GenerationSettings(max_new_tokens=4, do_sample=False, cache="static")
    with pytest.warns(UserWarning, match="StaticDecoder failed for MambaForCausalLM"):
        first = sample(model, tok, query, mask, static)
    assert static_failed(model) is not None
    second = sample(model, tok, query, mask, static)  # no second attempt, no second warning
    dynamic = sample(
        model, tok, query, mask, GenerationSettings(**{**vars(static), "cache": "dynamic"})
    )
    assert torch.equal(first[0], dynamic[0]) and torch.equal(second[0], dynamic[0])


def tiny_causal_lm(arch: str, vocab_size: int = 100, **extra) -> torch.nn.Module:
    """A random tiny model of one of the families users align (a LoRA-wrapped Llama too);
    ``extra``: more config fields."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=vocab_size)
    heads = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    family = arch.removesuffix("-lora")
    if family == "gpt2":
        config = AutoConfig.for_model(
            "gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=vocab_size, **extra
        )
    else:
        window = {"sliding_window": 4} if family in ("mistral", "gemma2") else {}
        config = AutoConfig.for_model(family, **size, **heads, **window, **extra)
    if family == "gemma2":
        config._attn_implementation = "eager"  # the only attention Gemma2 supports
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    if arch.endswith("-lora"):
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(model, lora)
    return model


@pytest.mark.parametrize("arch", ["mistral", "gemma", "gemma2", "qwen2", "gpt2", "llama-lora"])
def test_static_decoder_matches_generate_across_model_families(arch):
    """Sliding windows (Mistral, Gemma2), GQA, tied heads, GPT-2's own attention and a peft
    wrapper: greedy, left padding included, the tokens are generate's."""
    model = tiny_causal_lm(arch)
    tok = type("Tok", (), {"eos_token_id": 2, "pad_token_id": 0})
    query = torch.randint(3, 100, (3, 7))
    mask = torch.ones_like(query)
    query[0, :3], mask[0, :3] = 0, 0  # a left-padded row
    out = decode_both_caches(model, tok, query, mask, "cpu", max_new_tokens=12)
    assert static_failed(model) is None
    assert torch.equal(out["static"][0], out["dynamic"][0])


@pytest.mark.parametrize(
    "arch", ["llama", "mistral", "gemma", "gemma2", "qwen2", "gpt2", "llama-lora"]
)
def test_score_response_takes_log_probs_in_tiles_without_building_the_logits(arch):
    """The policy's response log-probs from the last hidden states in tiles equal those from
    the model's logits (left padding, temperature 0.8), and nothing of vocabulary width is kept
    for backward (but views of the head's weight), where the logits path keeps the [B, R, V]
    logits. Gemma 2 soft-caps its logits: it keeps the logits path. The hidden states are those
    that predict the response."""
    model = tiny_causal_lm(arch)  # eval: no dropout, as SALSA trains; grad still on
    weight = model.get_output_embeddings().weight
    vocab = weight.shape[0]
    seq = torch.randint(3, 100, (3, 12))
    mask = torch.ones_like(seq)
    seq[0, :3], mask[0, :3] = 0, 0
    response = seq[:, -5:]
    widths = {}
    for path in ("tiles", "logits"):
        saved = []

        def keep(t, saved=saved):  # views of the head's weight are no memory of their own
            if t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
                saved.append(t.shape)
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = score_response(
                model, seq, mask, response, 0.8, hidden=True, logits=path == "logits"
            )
        widths[path] = [s for s in saved if len(s) == 3 and s[-1] == vocab]
        if path == "tiles":
            tiles = out
    torch.testing.assert_close(tiles.logprobs, out.logprobs)
    torch.testing.assert_close(tiles.hidden, out.hidden)
    assert tiles.hidden.shape == (3, 5, weight.shape[1])
    assert widths["logits"]  # the logits path keeps the logits for backward
    if arch == "gemma2":
        assert output_layer(model) is None and tiles.logits is not None
    else:
        assert output_layer(model) is not None and tiles.logits is None
        assert widths["tiles"] == []


class LiveStorages(TorchDispatchMode):
    """The most storages of at least ``nbytes`` (but ``skip``'s) alive at once among those the
    operations inside the block create."""

    def __init__(self, nbytes: int, skip: torch.Tensor) -> None:
        super().__init__()
        self.nbytes, self.skip = nbytes, skip.untyped_storage().data_ptr()
        self.made: list[weakref.ref] = []
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= self.nbytes:
                self.made.append(weakref.ref(t))
        alive = {r().untyped_storage().data_ptr() for r in self.made if r() is not None}
        self.peak = max(self.peak, len(alive - {self.skip}))
        return out


@pytest.mark.parametrize(
    "arch", ["gpt2", "gpt2-checkpointed", "llama-pad", "qwen2", "gemma", "llama-lora"]
)
def test_a_tied_heads_backward_holds_one_vocabulary_sized_gradient(arch):
    """A policy whose head is its input embedding (GPT-2, with activation checkpointing too,
    Qwen2, a Llama whose embedding has a padding id) gets that weight's gradient as one [V, H]
    tensor: the head's part is kept aside and the lookup adds its rows into it (autograd alone
    holds 3 such tensors at once: the two parts and their sum); every gradient equals the
    logits path's, the padding id's row included, and no hook is left on the embedding.
    Gemma's scaled embedding and a LoRA policy's frozen one are left to autograd."""
    extra = {"pad_token_id": 0} if arch == "llama-pad" else {}
    if arch == "gpt2-checkpointed":  # checkpointing recomputes in training mode: no dropout
        extra = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    family = arch.removesuffix("-pad").removesuffix("-checkpointed")
    # V x H well above the other tensors
    tied = tiny_causal_lm(family, vocab_size=2000, tie_word_embeddings=True, **extra)
    if arch == "gpt2-checkpointed":
        tied.activation_checkpointing_enable()
        tied.train()
        assert tied.is_gradient_checkpointing
    embedding, head = tied.get_input_embeddings(), tied.get_output_embeddings()
    assert embedding.weight is head.weight
    if arch in ("gemma", "llama-lora"):
        assert tied_embedding(tied, head) is None
        return
    assert tied_embedding(tied, head) is embedding
    assert embedding.padding_idx == (0 if arch == "llama-pad" else None)
    seq = torch.randint(1, 2000, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(seq)
    seq[0, :3], mask[0, :3] = 0, 0  # left padding: the padding id is looked up
    grads, peaks = {}, {}
    for path in ("tiles", "logits"):
        model = copy.deepcopy(tied)
        weight = model.get_output_embeddings().weight
        hooks = dict(model.get_input_embeddings()._forward_hooks)  # checkpointing has one
        out = score_response(model, seq, mask, seq[:, -5:], 0.8, logits=path == "logits")
        with LiveStorages(weight.numel() * weight.element_size(), weight) as live:
            (out.logprobs * torch.arange(1.0, 6.0)).sum().backward()
        assert model.get_input_embeddings()._forward_hooks == hooks
        grads[path] = {n: p.grad for n, p in model.named_parameters()}
        peaks[path] = live.peak
    assert peaks["tiles"] == 1 and peaks["logits"] >= 3, peaks
    for name, grad in grads["tiles"].items():
        torch.testing.assert_close(grad, grads["logits"][name], msg=name)


# The forward's own name for its KV cache in the installed transformers: ``cache`` in recent 5.x
# releases, ``past_key_values`` before (where an unknown ``cache=`` vanishes into **kwargs).
LLAMA_CACHE = (
    "cache"
    if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
    else "past_key_values"
)


class OldCacheName(LlamaForCausalLM):
    """The shipped Llama with its forward's cache argument named ``past_key_values``."""

    def forward(self, *args, past_key_values=None, **kwargs):
        return super().forward(*args, **{LLAMA_CACHE: past_key_values}, **kwargs)


class DropsCache(LlamaForCausalLM):
    """The shipped Llama with a forward that takes a cache and never uses it."""

    def forward(self, *args, cache=None, past_key_values=None, **kwargs):
        return super().forward(*args, **kwargs)


def test_static_decoder_passes_the_cache_under_the_forwards_own_name():
    tok, model, query, mask = setup()
    old = OldCacheName.from_pretrained(BASE).eval()
    settings = GenerationSettings(max_new_tokens=10, do_sample=False)
    static = sample(
        old, tok, query, mask, GenerationSettings(**{**vars(settings), "cache": "static"})
    )
    assert static_failed(old) is None
    assert torch.equal(static[0], sample(model, tok, query, mask, settings)[0])


def test_the_static_decoder_refuses_a_model_that_ignores_its_cache():
    """Decoding token by token with a cache the model never fills would be silently wrong: the
    decoder checks after the prompt and raises, which ``sample`` turns into a fallback."""
    tok, _, query, mask = setup()
    model = DropsCache.from_pretrained(BASE).eval()
    decoder = static_decoder(model, len(PROMPTS), 4)
    with pytest.raises(SalsaError, match="did not write the prompt into the StaticCache"):
        decoder(query, mask, GenerationSettings(do_sample=False), tok.eos_token_id, 0)


# ----------------------------------------------------------------------------- sharded, 2 processes

SHARDED = Path(__file__).resolve().parents[1] / "benchmarks" / "sharded_generation.py"
TINY = ["--preset", "tiny", "--repeats", "1", "--new-tokens", "8", "--batch", "4"]


def sharded_rollouts(*args: str) -> dict:
    """benchmarks/sharded_generation.py on 2 CPU processes (gloo): the tiny model sharded, one
    rollout in each mode after a warm-up; its summary line (a run in which a rank was killed by
    a signal runs once more)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SHARDED), *TINY, *args]
    proc = run_rerun_if_killed(cmd, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ("--strategy", "fsdp2", "--rank0-stops-first"),
        ("--strategy", "fsdp2", "--lora", "--cache", "static"),
        ("--strategy", "fsdp1", "--lora"),
    ],
    ids=["fsdp2-greedy", "fsdp2-lora-static", "fsdp1-lora"],
)
def test_a_sharded_rollout_gathers_the_policy_once(args):
    """Gather-once (``generation.gather: once``) against FSDP's per-layer gathers, 8 new tokens
    on 2 ranks: at most one all-gather per FSDP unit per rollout (per layer: one per decoder
    block and token), the same tokens under one seed (sampled at temperature 0.9, top-p 0.95;
    greedy with the StaticDecoder, whose draws differ from generate's, or to stop rank 0
    first), and every parameter sharded again afterwards. Greedy, with EOS the first token
    rank 0 decodes, rank 0 stops after one step in gather-once mode while rank 1 decodes on
    (no lockstep); per layer both ranks run every step. The LoRA policy (a peft model, whose
    generate never calls its FSDP2 root's forward) and the StaticDecoder decode sharded too."""
    out = sharded_rollouts(*args)
    once, per_layer, units = out["once"], out["per_layer"], out["units"]
    layers = 4  # the tiny model's decoder blocks
    assert units == (5 if "fsdp2" in args else 6)  # + the root; FSDP1: + backbone and head
    assert 0 < once["gathers_per_rollout"] <= units
    assert per_layer["gathers_per_rollout"] >= layers * 8
    assert once["gathered_bytes_per_rollout"] * 6 < per_layer["gathered_bytes_per_rollout"]
    assert out["same_tokens"]
    assert once["resharded"] and per_layer["resharded"]
    if "--rank0-stops-first" in args:
        assert once["forwards_per_rank"][0] == 1 and once["forwards_per_rank"][1] > 1
        assert per_layer["forwards_per_rank"][0] == per_layer["forwards_per_rank"][1]


def sharded_tiles_worker(rank: int, port: int, arch: str) -> None:
    """One of 2 gloo ranks: :func:`sharded_tiles_passes`, then the group ends after the sharded
    models are freed."""
    import torch.distributed as dist

    from salsa_lightning.sharding import end_process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        sharded_tiles_passes(rank, arch)
    finally:
        end_process_group()


def sharded_tiles_passes(rank: int, arch: str) -> None:
    """The same random model sharded by FSDP2 twice, two passes of each (forward and backward)
    through the tiles and through the logits."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from salsa_lightning.sharding import is_resharded, shard

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
    seq = torch.randint(3, 100, (3, 12), generator=torch.Generator().manual_seed(rank))
    mask = torch.ones_like(seq)
    seq[0, :3], mask[0, :3] = 0, 0
    response, weights = seq[:, -5:], torch.arange(1.0, 6.0)
    passes = {}
    for path in ("tiles", "logits"):
        model = shard(tiny_causal_lm(arch), mesh)
        assert output_layer(model) is not None
        for _ in range(2):  # the second pass starts from the state backward left
            out = score_response(model, seq, mask, response, 0.8, logits=path == "logits")
            (out.logprobs * weights).sum().backward()
        assert (out.logits is None) == (path == "tiles")
        assert is_resharded(model)
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        passes[path] = out.logprobs.detach(), grads
    (tiles, tile_grads), (logits, logit_grads) = passes["tiles"], passes["logits"]
    torch.testing.assert_close(tiles, logits)
    assert tile_grads.keys() == logit_grads.keys() and tile_grads
    for name, grad in tile_grads.items():
        torch.testing.assert_close(grad, logit_grads[name], msg=name)
    dist.barrier()  # no rank ends the group while another still uses it


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-lora"])
def test_an_fsdp2_sharded_model_takes_its_log_probs_in_tiles(arch):
    """Under FSDP2 (2 CPU ranks) the root keeps its units' weights gathered after its forward,
    so the tiles read the head's whole weight: the log-probs and every weight's gradient,
    reduced over the ranks, equal the logits path's (tied and untied heads, a LoRA policy),
    and every weight is sharded again after backward."""
    for attempt in (1, 2):
        try:
            torch.multiprocessing.spawn(sharded_tiles_worker, args=(free_port(), arch), nprocs=2)
            return
        except torch.multiprocessing.ProcessExitedException as err:
            if attempt == 2 or KILLED not in str(err):
                raise
            warnings.warn(f"a rank was killed by a signal; run again: {err}", stacklevel=1)
