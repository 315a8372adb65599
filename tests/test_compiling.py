"""``model.compile``: compiled transformer stacks score, train and decode as eager ones, and a
new response length compiles nothing more."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from test_generation import tiny_causal_lm
from torch._dynamo.utils import counters

from salsa_lightning.compiling import (
    check_compile,
    compile_forwards,
    is_compiled,
    transformer_stack,
)
from salsa_lightning.errors import SalsaError
from salsa_lightning.generation import GenerationSettings, sample, score_response
from salsa_lightning.scoring import RewardEnsemble, ValueModel
from salsa_lightning.sharding import decoder_layers


def graphs() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    return counters["stats"]["unique_graphs"]


def rollout(length: int, response: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    sequence = torch.randint(3, 100, (4, length), generator=g)
    mask = torch.ones(4, length)
    mask[0, :3] = 0  # a left-padded row
    return sequence, mask, sequence[:, -response:]


def scores_and_grads(model, sequence, mask, response) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    logprobs = score_response(model, sequence, mask, response).logprobs
    logprobs.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logprobs.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-lora"])
def test_compiled_forwards_score_and_train_as_eager_ones(arch):
    """Log-probs and every weight's gradient as the eager model's (to float32 rounding), for
    three response lengths, of which the second and third compile no new graph. GPT-2's head
    is tied to its input embedding, so its blocks are compiled one by one."""
    torch.manual_seed(0)
    eager = tiny_causal_lm(arch)  # eval: no dropout, as SALSA trains its policy
    model = copy.deepcopy(eager)
    compiled = compile_forwards(model)
    expected = decoder_layers(model) if arch == "gpt2" else [transformer_stack(model)]
    assert compiled == expected and is_compiled(model) and not is_compiled(eager)
    assert torch._dynamo.config.recompile_limit >= 64  # every stack shares one function
    for i, (length, response) in enumerate([(14, 8), (11, 5), (17, 9)]):
        before = graphs()
        got = scores_and_grads(model, *rollout(length, response, seed=i))
        want = scores_and_grads(eager, *rollout(length, response, seed=i))
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        assert got[1].keys() == want[1].keys() and got[1]
        for name in want[1]:
            torch.testing.assert_close(got[1][name], want[1][name], atol=1e-5, rtol=1e-4)
        with torch.no_grad():  # the frozen models' scoring
            frozen = score_response(model, *rollout(length, response, seed=i)).logprobs
        torch.testing.assert_close(frozen, want[0], atol=1e-5, rtol=1e-5)
        if i:
            assert graphs() == before, f"length {length} compiled again"


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_compiled_model_decodes_eagerly_as_before(cache):
    """``generate`` and the uncompiled StaticDecoder call a compiled stack eagerly: the same
    tokens as the eager model's, and no graph compiled for each state of the KV cache."""
    eager = tiny_causal_lm("llama")
    model = copy.deepcopy(eager)
    compile_forwards(model)
    tok = type("Tok", (), {"eos_token_id": 2, "pad_token_id": 0})
    query, mask, _ = rollout(7, 1, seed=0)
    settings = GenerationSettings(max_new_tokens=6, do_sample=False, cache=cache)
    before = graphs()
    got = sample(model, tok, query, mask.long(), settings)
    assert graphs() == before
    want = sample(eager, tok, query, mask.long(), settings)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_compile_runs_on_one_device_and_says_so_otherwise():
    check_compile(SingleDeviceStrategy(torch.device("cpu")))
    with pytest.raises(SalsaError, match=r"model.compile: .*DDPStrategy.*trainer.devices: 1"):
        check_compile(DDPStrategy())


def test_compile_on_the_cpu_without_a_cpp_compiler_is_refused_first(
    stage_outputs, task_dir, tmp_path, capsys
):
    """``salsa fit ... --model.init_args.compile true`` where Inductor's own compiler search
    finds none (pointed at one that does not exist): one line saying what to install, before
    any model is built or anything written."""
    import torch._inductor.config as inductor
    from test_salsa import cli_salsa

    from salsa_lightning.cli import main

    args = cli_salsa(stage_outputs, task_dir, tmp_path, "--model.init_args.compile", "true")
    with inductor.patch({"cpp.cxx": ("no-such-c++",)}):
        assert main(args) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(r"error: model.compile on the CPU: .*no C\+\+ compiler .*Install one", line)
    assert not (tmp_path / "policy").exists() and not (tmp_path / "ckpt").exists()


def test_the_models_a_module_holds_are_compiled_each():
    """A critic (``ValueModel``) and a reward ensemble hold transformers models: each one's
    stack is compiled, and the ensemble scores as the eager one."""
    members = [tiny_causal_lm("llama"), tiny_causal_lm("qwen2")]
    ensemble = RewardEnsemble(copy.deepcopy(members), [0.25, 0.75])
    compiled = compile_forwards(ensemble)
    assert compiled == [transformer_stack(m) for m in ensemble.members]
    sequence, mask, _ = rollout(9, 1, seed=0)
    with torch.no_grad():
        got = ensemble(input_ids=sequence, attention_mask=mask).logits
        want = RewardEnsemble(members, [0.25, 0.75])(input_ids=sequence, attention_mask=mask)
    torch.testing.assert_close(got, want.logits, atol=1e-5, rtol=1e-5)
    critic = ValueModel(tiny_causal_lm("llama"))
    assert compile_forwards(critic) == [transformer_stack(critic.classifier)]


def test_a_model_without_a_transformer_stack_is_named():
    with pytest.raises(ValueError, match="Linear has no transformer stack"):
        compile_forwards(torch.nn.Linear(2, 2))


@pytest.mark.slow  # about a minute: the three models compile in the first rollout
def test_salsa_fit_with_model_compile_trains_as_the_eager_run(stage_outputs, task_dir, tmp_path):
    """``salsa fit --config configs/salsa.yaml --model.init_args.compile true``: the exported
    policy is the eager run's to float32 rounding (3 rollouts: the critic, the reference and
    the reward model compiled too), and it moved away from where it started."""
    from cli_plugins import RecordCompiled
    from safetensors.torch import load_file
    from test_salsa import cli_salsa

    from salsa_lightning.cli import main

    policies, record = {}, ["--trainer.callbacks+=cli_plugins.RecordCompiled"]
    RecordCompiled.seen.clear()
    for name, extra in (("eager", []), ("compiled", ["--model.init_args.compile", "true"])):
        root = tmp_path / name
        assert main(cli_salsa(stage_outputs, task_dir, root, *record, *extra)) == 0
        policies[name] = load_file(root / "policy" / "model.safetensors")
    models = ["policy", "critic", "reward", "reference 0"]  # the soup: one reference model
    assert RecordCompiled.seen == [dict.fromkeys(models, False), dict.fromkeys(models, True)]
    sft = [load_file(stage_outputs[k] / "model.safetensors") for k in ("sft-1", "sft-2")]
    soup = {n: (sft[0][n] + sft[1][n]) / 2 for n in sft[0]}  # where the policy starts
    assert policies["compiled"].keys() == policies["eager"].keys()
    for name, weight in policies["eager"].items():
        torch.testing.assert_close(policies["compiled"][name], weight, atol=1e-5, rtol=1e-4)
    moved = [n for n, w in policies["eager"].items() if (w - soup[n]).abs().max() > 1e-4]
    assert len(moved) > len(soup) // 2


@pytest.mark.slow  # about a minute: each stage's models compile in its first step
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_every_stage_with_compile_trains_as_the_eager_one(stage, stage_outputs, task_dir, tmp_path):
    """SFT, the reward model and DPO with ``compile=True``: 4 steps and a validation give the
    eager run's weights and validation numbers to float32 rounding, the models compiled in
    place (DPO's reference too) and trained (the weights moved)."""
    import lightning as L
    from conftest import BASE, _fit
    from safetensors.torch import load_file

    from salsa_lightning import (
        DPOModule,
        PreferenceDataModule,
        RewardModule,
        SFTDataModule,
        SFTModule,
    )
    from salsa_lightning.soup import SoupReference

    sft = str(stage_outputs["sft-1"])

    def build(compile: bool) -> tuple[L.LightningModule, L.LightningDataModule]:
        adam = lambda p: torch.optim.AdamW(p, lr=1e-3)  # noqa: E731
        if stage == "sft":
            data = SFTDataModule(tokenizer=str(BASE), task_dir=str(task_dir), batch_size=8)
            return SFTModule(model=str(BASE), optimizer=adam, compile=compile), data
        data = PreferenceDataModule(tokenizer=sft, task_dir=str(task_dir), batch_size=8)
        if stage == "reward":
            return RewardModule(model=sft, optimizer=adam, compile=compile), data
        reference = SoupReference([sft])
        return DPOModule(reference=reference, optimizer=adam, compile=compile), data

    runs = {}
    for compile in (False, True):
        L.seed_everything(0)
        module, data = build(compile)
        _fit(module, data, tmp_path / str(compile), steps=4)
        models = [module.policy, module.reference_model] if stage == "dpo" else [module.model]
        runs[compile] = (
            {n: p.detach().clone() for n, p in models[0].named_parameters()},
            {k: float(v) for k, v in module.trainer.callback_metrics.items()},
            [is_compiled(m) for m in models],
        )
    (eager, eager_metrics, off), (compiled, compiled_metrics, on) = runs[False], runs[True]
    assert not any(off) and all(on) and len(on) == (2 if stage == "dpo" else 1)
    assert eager_metrics.keys() == compiled_metrics.keys() and eager_metrics
    for name, value in eager_metrics.items():
        assert compiled_metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    for name, weight in eager.items():
        torch.testing.assert_close(compiled[name], weight, atol=1e-5, rtol=1e-4)
    start = load_file(Path(str(BASE) if stage == "sft" else sft) / "model.safetensors")
    moved = [n for n in start if n in eager and (eager[n] - start[n]).abs().max() > 1e-4]
    assert len(moved) > len(start) // 2, moved
