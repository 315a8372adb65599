"""Tests of the benchmarks against TRL (benchmarks/ppo_vs_trl.py, benchmarks/grpo_vs_trl.py) and
their pieces (harness.py, workload.py, roofline.py).

Our side alone (``--systems ours``) and the pieces run with the dev extra only. The comparisons
need TRL and are skipped without it: ``ppo_vs_trl.py`` TRL 1.12 (the ``bench`` extra) in this
environment; ``grpo_vs_trl.py`` runs TRL's newest release from its own environment, which it
builds once per machine (under ``~/.cache/salsa_lightning``), or from ``SALSA_TRL_PYTHON`` when
that names a Python with it; our side then runs from an environment of its own too, built there
from the project's dependencies alone. CI runs them in a step of their own with the bench extra installed
(``.ci/run``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_rerun_if_killed

pytestmark = pytest.mark.slow  # subprocesses, a few seconds of PPO each

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "ppo_vs_trl.py"
GRPO_SCRIPT = BENCHMARKS / "grpo_vs_trl.py"
SHARDED_UPDATE = BENCHMARKS / "sharded_update.py"
# One timed iteration of a short rollout: enough to exercise every path, quick on 2 CPU cores.
SMALL = ["--preset", "tiny", "--iterations", "1", "--repeats", "1", "--threads", "1"]

sys.path.insert(0, str(BENCHMARKS))
import grpo_vs_trl  # noqa: E402
import harness  # noqa: E402
import roofline  # noqa: E402
import workload  # noqa: E402


def run_benchmark(*args: str, tmp_path: Path, script: Path = SCRIPT) -> dict:
    """The script's last JSON line. A run of the sharded script in which a rank was killed by a
    signal (gloo has aborted a rank as it exited) runs once more, with a warning."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    res = run_rerun_if_killed([sys.executable, str(script), *args], env=env, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    last = res.stdout.strip().splitlines()[-1]
    return json.loads(last)


def assert_full_length(out: dict) -> None:
    """Same work on both sides: every run decoded exactly batch x new_tokens per iteration."""
    s = out["settings"]
    for run in out["runs"]:
        assert run["generated_tokens"] == s["batch_size"] * s["new_tokens"] * s["iterations"]
        if "decoded_tokens" in run:
            assert run["decoded_tokens"] == run["generated_tokens"], run["system"]


def test_compare_with_trl(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    pytest.importorskip("trl.experimental.ppo", reason="TRL 1.12 (the bench extra) has PPO")
    out = run_benchmark(*SMALL, "--device", "cpu", "--systems", "ours,trl", tmp_path=tmp_path)
    assert out["ratio_tokens_per_s"] > 0
    assert out["ratio_peak_memory"] > 0
    for system in ("ours", "trl"):
        assert out[system]["tokens_per_s"] > 0
        assert out[system]["generation_tokens_per_s"] > 0
        assert out[system]["peak_memory_mib"] > 0
    assert [r["system"] for r in out["runs"]] == ["ours", "trl"]
    assert_full_length(out)
    assert set(out["speedup_per_phase"]) == {"generation", "scoring", "update"}
    assert out["commit"] and out["machine"]["cores"] >= 1


def test_ours_alone(tmp_path: Path) -> None:
    args = ("--systems", "ours,ours-grpo", "--new-tokens", "8")
    out = run_benchmark(*SMALL, *args, tmp_path=tmp_path)
    assert out["ours"]["tokens_per_s"] > 0
    assert out["ours"]["peak_memory_mib"] > 0
    assert "trl" not in out
    assert out["ratio_tokens_per_s"] is None
    # GRPO on the same responses (no critic): its peak is reported beside PPO's (measured by
    # the script, not asserted: RSS on a shared machine is noisy).
    assert [r["system"] for r in out["runs"]] == ["ours", "ours-grpo"]
    assert_full_length(out)
    assert out["ratio_grpo_peak_memory"] > 0
    assert out["settings"]["new_tokens"] == 8
    assert not list(tmp_path.glob("ppo-bench-*")), "the temporary directory was not removed"


# ----------------------------------------------------------------------------- grpo_vs_trl.py


def trl_python() -> list[str]:
    """``--trl-python`` from ``SALSA_TRL_PYTHON``, else nothing (the benchmark builds TRL's
    environment, or reuses the one it built)."""
    python = os.environ.get("SALSA_TRL_PYTHON")
    return ["--trl-python", python] if python else []


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_grpo_rloo_compare_with_trl(estimator: str, tmp_path: Path) -> None:
    pytest.importorskip("trl", reason="the bench extra: pip install -e '.[bench]'")
    args = [*SMALL, "--new-tokens", "8", "--estimator", estimator, *trl_python()]
    out = run_benchmark(*args, tmp_path=tmp_path, script=GRPO_SCRIPT)
    assert [r["system"] for r in out["runs"]] == ["ours", "trl"]
    assert out["ratio_tokens_per_s"] > 0 and out["ratio_peak_memory"] > 0
    assert_full_length(out)
    assert all("decoded_tokens" in r for r in out["runs"])  # both counted what they decoded
    assert out["software"]["trl"]["trl"] == grpo_vs_trl.TRL_VERSION
    # Each side from an environment of its own, neither this one (which holds the dev extra).
    environments = {out["software"][name]["environment"] for name in ("ours", "trl")}
    assert len(environments) == 2 and sys.prefix not in environments
    assert out["software"]["ours"]["lightning"]
    for phase in ("generation", "scoring", "update"):
        assert out["trl"][f"{phase}_s"] > 0 and out["ours"][f"{phase}_s"] > 0
        assert out["roofline"]["systems"]["trl"]["fraction"][phase] > 0
    # The settings each side changed from its trainer's defaults, as the runs report them.
    trl = out["changed_from_defaults"]["trl"]
    for name in ("lr_scheduler_type", "gradient_checkpointing", "bf16", "disable_dropout"):
        assert name in trl, name
    ours = out["changed_from_defaults"]["ours"]
    assert ours["estimator"]["name"] == estimator
    assert ours["estimator"]["samples_per_prompt"] == grpo_vs_trl.SAMPLES_PER_PROMPT
    if estimator == "grpo":
        assert "use_bias_correction_kl" in trl and "beta" in trl  # TRL's default beta is 0
        assert ours["kl"]["in_reward"] is False
        assert ours["estimator"]["loss_aggregation"] == "token_mean"
    else:
        assert "beta" not in trl  # TRL's RLOO default, 0.05, is ours
    assert {a["trl"] for a in out["algorithm"]} >= {"epsilon=0.2", "max_grad_norm=1.0"}


def test_grpo_ours_alone(tmp_path: Path) -> None:
    """Our side of grpo_vs_trl.py needs no TRL: every response is full length, the settings it
    changed are recorded, no ratio."""
    args = [*SMALL, "--new-tokens", "8", "--estimator", "rloo", "--systems", "ours"]
    args += ["--ours-python", sys.executable]  # this environment: nothing to build
    out = run_benchmark(*args, tmp_path=tmp_path, script=GRPO_SCRIPT)
    assert [r["system"] for r in out["runs"]] == ["ours"]
    assert out["software"]["ours"]["environment"] == sys.prefix
    assert out["runs"][0]["decoded_tokens"] == 16 * 8
    assert_full_length(out)
    assert out["ratio_tokens_per_s"] is None
    assert out["changed_from_defaults"]["ours"]["reward"]["clip"] is None
    # The tiny preset compiles ours' forwards (model.compile) and decoding (generation.compile).
    assert out["settings"]["compile_forwards"] and out["settings"]["compile_decoding"]
    assert out["changed_from_defaults"]["ours"]["model"] == {"compile": True}
    assert out["settings"]["ppo_epochs"] == 1 and out["settings"]["estimator"] == "rloo"
    assert not list(tmp_path.glob("grpo-bench-*")), "the temporary directory was not removed"


def test_sharded_update_runs_both_modes_under_fsdp2(tmp_path: Path) -> None:
    """sharded_update.py on 2 CPU processes: each mode in its own processes (the tiles' run
    checks that the sharded policy takes them), one warm-up and one timed pass, then the
    ratios."""
    args = ["--preset", "tiny", "--passes", "1", "--response", "16", "--batch", "2"]
    out = run_benchmark(*args, tmp_path=tmp_path, script=SHARDED_UPDATE)
    for mode in ("tiles", "logits"):
        assert out[mode]["pass_s"] > 0 and out[mode]["peak_memory_mib"] >= 0
    assert out["ratio_pass_s"] > 0 and out["settings"]["world"] == 2


def test_grpo_refuses_unequal_algorithms(tmp_path: Path) -> None:
    """RLOO over several epochs is not the same algorithm on both sides (TRL clips a
    sequence-level ratio): refused before anything is built."""
    with pytest.raises(SystemExit, match="--ppo-epochs must be 1"):
        grpo_vs_trl.main(["--estimator", "rloo", "--ppo-epochs", "2"])
    with pytest.raises(SystemExit, match="multiples of 4"):
        grpo_vs_trl.main(["--batch-size", "6", "--systems", "ours"])


def test_trl_prompts_tokenize_as_ours(tmp_path: Path) -> None:
    """TRL's rows tokenize to our prompt ids, and prompt + decoded completion re-tokenizes to
    prompt ids + completion ids (what TRL's reward model reads)."""
    s = {"device": "cpu", "dtype": "float32", "seed": 0, "prompt_length": 6, "new_tokens": 4}
    s.update(batch_size=2, warmup=1, iterations=1)
    preset = {**workload.PRESETS["tiny"], "layers": 1}
    inputs = workload.make_inputs(tmp_path, preset, s)
    tokenizer = workload.make_tokenizer(preset["vocab"])
    rows = grpo_vs_trl.trl_prompts(inputs, tokenizer, chat=False)
    ids = json.loads(Path(inputs["prompt_ids"]).read_text())
    assert len(rows) == len(ids) == 4
    completion = [7, 300, 9]
    text = rows[1]["prompt"] + tokenizer.decode(completion, skip_special_tokens=True)
    assert tokenizer(text)["input_ids"] == ids[1] + completion
    # A prompt TRL would tokenize otherwise is refused.
    Path(inputs["prompt_ids"]).write_text(json.dumps([[ids[0][0] ^ 1, *ids[0][1:]], *ids[1:]]))
    with pytest.raises(SystemExit, match="TRL would tokenize the first prompt"):
        grpo_vs_trl.trl_prompts(inputs, tokenizer, chat=False)


def test_a_built_environment_is_reused(tmp_path: Path) -> None:
    """A complete environment (its marker names what it was built for) is reused as it is."""
    where = tmp_path / "trl-9.9.9"
    (where / "bin").mkdir(parents=True)
    (where / "built-for").write_text("trl==9.9.9\n")
    assert grpo_vs_trl.trl_python("9.9.9", where) == str(where / "bin" / "python")
    assert (where / "built-for").read_text() == "trl==9.9.9\n"
    ours = tmp_path / "ours"
    (ours / "bin").mkdir(parents=True)
    (ours / "built-for").write_text("\n".join(harness.project_requirements()) + "\n")
    assert harness.ours_python(ours) == str(ours / "bin" / "python")


def test_our_environment_holds_the_project_dependencies_alone() -> None:
    """Our side's environment is built from pyproject's dependencies, without any extra."""
    import tomllib

    pyproject = tomllib.loads((BENCHMARKS.parent / "pyproject.toml").read_text())
    wanted = {r.split(";")[0].replace(" ", "") for r in pyproject["project"]["dependencies"]}
    got = {r.split(";")[0].replace(" ", "") for r in harness.project_requirements()}
    assert got == wanted


def test_changed_fields_and_results_file(tmp_path: Path) -> None:
    from salsa_lightning.ppo import KLSettings

    chosen = KLSettings(coef=0.05, estimator="k3", in_reward=False)
    assert harness.changed_fields(chosen, KLSettings()) == {"estimator": "k3", "in_reward": False}
    results = tmp_path / "results.jsonl"
    results.write_text('{"old": 1}')  # no final newline: the new line still starts its own
    harness.finish({"new": 2}, str(results))
    assert [json.loads(x) for x in results.read_text().splitlines()] == [{"old": 1}, {"new": 2}]
    assert not list(tmp_path.glob(".*tmp*")), "the temporary file was left behind"


def test_sft_step_runs_both_modes_on_the_same_loss() -> None:
    """benchmarks/sft_step.py: each mode in its own process, the same loss from the tiles and
    from the logits, and the ratios as the last line."""
    cmd = [sys.executable, str(BENCHMARKS / "sft_step.py"), "--preset", "base"]
    cmd += ["--batch", "2", "--length", "16", "--steps", "1", "--repeats", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    runs, last = lines[:-1], lines[-1]
    assert [r["mode"] for r in runs] == ["tiles", "logits"]
    assert runs[0]["loss"] == pytest.approx(runs[1]["loss"], rel=1e-5)
    assert last["ratio_step_s"] > 0
    # at 2 x 16 tokens the logits' peak above the settled RSS can round to 0 MiB: no ratio then
    peak = last["logits"]["peak_mib"]
    assert (last["ratio_peak_memory"] is None) == (peak == 0), last
    assert last["tiles"]["step_s"] == runs[0]["step_s"]


def test_a_run_after_another_is_not_dirty_for_the_results_it_appended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dirty`` marks uncommitted code, not the tracked results file that the previous run of
    a series appended to (every run but the first of a series was "dirty" before)."""

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    results = tmp_path / "benchmarks" / "results" / "cpu.jsonl"
    results.parent.mkdir(parents=True)
    results.write_text('{"run": 1}\n')
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "results and code")
    monkeypatch.setattr(harness, "REPO", tmp_path)
    assert harness.provenance("cpu")["dirty"] is False
    with results.open("a") as f:
        f.write('{"run": 2}\n')
    assert harness.provenance("cpu")["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert harness.provenance("cpu")["dirty"] is True


def test_a_childs_peak_memory_is_its_own_not_its_parents() -> None:
    """A child's peak RSS leaves out the benchmark process that started it: ru_maxrss would
    start at this process's peak (torch and transformers imported, hundreds of MiB) and hide a
    tiny preset's own."""
    parent_peak = harness.rss_mib("VmHWM")
    assert parent_peak > 200, parent_peak  # this process has imported torch
    code = f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import harness; "
    code += "print(harness.peak_memory_mib('cpu'))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert float(res.stdout) < 100, (float(res.stdout), parent_peak)  # the standard library alone


def test_cpu_limits_are_measured_on_the_runs_threads() -> None:
    """The children run on --threads torch threads: the CPU's limits are measured on as many (a
    limit of two threads against a run of one halved every fraction), and the benchmark's own
    process keeps its threads."""
    import torch

    before = torch.get_num_threads()
    limits = roofline.device_limits("cpu", "float32", threads=1)
    assert limits.source.endswith(", 1 threads"), limits.source
    assert limits.flops > 0 and limits.bandwidth > 0
    assert torch.get_num_threads() == before
    assert roofline.device_limits("cpu", "float32").source.endswith(f", {before} threads")


def test_roofline_bounds_by_hand(tmp_path: Path) -> None:
    """The issue's 1b arithmetic and a tiny checkpoint's parameter counts, worked by hand."""
    # 1e9 multiply parameters, batch 16 x (64 + 128) tokens, 4 epochs, policy + critic:
    # 4 x 3 x 2 x 2e9 x 3072 = 1.4746e14 FLOPs, 0.149 s at 989 TFLOP/s.
    model = roofline.ModelSize(params=10**9, matmul_params=10**9, layers=16, kv_width=1024)
    w = roofline.Work(batch=16, prompt=64, new_tokens=128, epochs=4, bytes_per_param=2)
    h200 = roofline.Limits(989e12, 4.8e12, "spec")
    assert roofline.update_bound(model, model, w, h200) == pytest.approx(
        1.4746e14 / 989e12, rel=1e-3
    )
    assert roofline.update_bound(model, None, w, h200) == pytest.approx(
        0.5 * 1.4746e14 / 989e12, rel=1e-3
    )
    # Decoding reads 2 GB of weights per token: 128 x 2e9 B at 4.8 TB/s = 53.3 ms, plus the KV
    # cache: 16 layers x 1024 x 2 B x 16 rows = 0.5 MiB per cached token, sum_t (64 + t) tokens.
    cache = sum(64 + t for t in range(128)) * 16 * 1024 * 2 * 16
    assert roofline.generation_bound(model, w, h200) == pytest.approx((128 * 2e9 + cache) / 4.8e12)
    # Scoring: reference + reward forward, 2 x 2e9 x 3072 FLOPs.
    assert roofline.scoring_bound(model, model, w, h200) == pytest.approx(2 * 2e9 * 3072 / 989e12)
    assert roofline.fractions({"update": 1.0}, {"update": 4.0}) == {"update": 0.25}

    # A tiny Llama with tied embeddings: embed 10 x 4 (a lookup; the tied head multiplies it),
    # one layer of q, k, v, o (4 x 4 each) and an MLP of 3 x (4 x 8).
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    size = roofline.model_size(tmp_path / "tiny")
    # q 16, k 8, v 8 (one 2-wide KV head), o 16, mlp 96, norms 4 + 4 + 4: 156; embed 40
    assert size.params == 156 + 40
    assert size.matmul_params == 156 + 40  # minus the lookup (40), plus the tied head (40)
    assert size.kv_width == 2 * 1 * 2 and size.layers == 1
