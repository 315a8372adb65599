"""Sampling and response log-probs (salsa_lightning.generation) on the shipped tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import BASE
from transformers import AutoModelForCausalLM, AutoTokenizer

from salsa_lightning import functional as F
from salsa_lightning.data import left_padded_prompts
from salsa_lightning.errors import SalsaError
from salsa_lightning.generation import (
    GenerationSettings,
    response_logprobs,
    sample,
    use_static_cache,
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
    assert torch.equal(rmask, F.response_mask(response, tok.eos_token_id))
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


def decode_both_caches(model, tok, query, mask, device):
    model, query, mask = model.to(device), query.to(device), mask.to(device)
    out = {}
    for cache in ("dynamic", "static"):
        settings = GenerationSettings(max_new_tokens=10, do_sample=False, cache=cache)
        out[cache] = sample(model, tok, query, mask, settings)
    return out


def test_static_cache_decodes_the_same_tokens_as_the_dynamic_one():
    """The static cache (padded prompt bucket, GPU-compiled) is an optimisation only."""
    tok, model, query, mask = setup()
    out = decode_both_caches(model, tok, query, mask, "cpu")
    assert torch.equal(out["static"][0], out["dynamic"][0])
    assert torch.equal(out["static"][1], out["dynamic"][1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_static_cache_on_gpu_matches_dynamic_decoding():
    tok, model, query, mask = setup()
    out = decode_both_caches(model, tok, query, mask, "cuda")  # fp32: no bf16 argmax ties
    assert torch.equal(out["static"][0], out["dynamic"][0])


def test_cache_setting_is_checked_and_auto_picks_static_only_on_one_gpu():
    with pytest.raises(SalsaError, match="generation.cache"):
        GenerationSettings(cache="paged")
    assert use_static_cache("auto", torch.device("cuda", 0), sharded=False)
    assert not use_static_cache("auto", torch.device("cuda", 0), sharded=True)
    assert not use_static_cache("auto", torch.device("cpu"), sharded=False)
    assert use_static_cache("static", torch.device("cpu"), sharded=False)
