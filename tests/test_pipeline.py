"""salsa evaluate, salsa landscape and the pipeline driver, on real tiny checkpoints."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS
from transformers import LlamaConfig, LlamaForCausalLM

from salsa_lightning import pipeline
from salsa_lightning.cli import main, parse_with_fit_args, pipeline_parser, quickstart_parser
from salsa_lightning.errors import SalsaError
from salsa_lightning.evaluate import evaluate, load_answers, load_prompts
from salsa_lightning.generation import GenerationSettings
from salsa_lightning.landscape import landscape
from salsa_lightning.pipeline import Stage, run_pipeline, select_stages
from salsa_lightning.report import frontier, interpolate
from salsa_lightning.reward import sampled_pairs

GEN = GenerationSettings(max_new_tokens=8)


def test_prompt_file_without_prompt_column_is_refused(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"text": "Sort: 3 1 2"}) + "\n")
    with pytest.raises(SalsaError, match=r"q\.jsonl.*no prompt column.*found \['text'\]"):
        load_prompts(path)


def test_evaluate_writes_answers_scores_and_win_rates(stage_outputs, task_files, tmp_path):
    out = stage_outputs
    results = evaluate(
        models={"a": str(out["sft-1"]), "same": str(out["sft-1"]), "b": str(out["sft-2"])},
        prompts={"val": str(task_files["prompts_val"])},
        output=str(tmp_path / "eval"),
        reward_model=str(out["reward"]),
        references={"b": str(out["sft-1"]), "same": str(out["sft-1"])},
        pairs=[["a", "same"], ["b", "a"]],
        max_prompts=16,
        generation=GEN,
        batch_size=8,
    )
    res = results["sets"]["val"]
    # The same model under the same sampling noise ties on every prompt: win rate exactly 0.5.
    assert res["win_rates"]["a_vs_same/score"]["mean"] == 0.5
    assert res["win_rates"]["a_vs_same/gold"]["mean"] == 0.5
    assert res["models"]["same"]["kl"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert res["models"]["b"]["kl"]["mean"] != 0.0
    stats = res["win_rates"]["b_vs_a/score"]
    assert 0.0 <= stats["ci_low"] <= stats["mean"] <= stats["ci_high"] <= 1.0
    rows = [
        json.loads(line)
        for line in (tmp_path / "eval/answers/val/b.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 16 and rows[3]["question_id"] == 3 and rows[3]["model_id"] == "b"
    assert rows[3]["choices"][0]["turns"] == [rows[3]["answer"]]
    assert {"score", "gold", "kl"} <= set(rows[3])
    back = load_answers(tmp_path / "eval")["val"]["b"]
    assert back["score"].tolist() == pytest.approx([r["score"] for r in rows])
    assert (tmp_path / "eval/rewards.png").stat().st_size > 0
    assert "| comparison |" in (tmp_path / "eval/report.md").read_text()


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("max_prompts", 0, "max_prompts must be at least 1 (null: every prompt), got 0."),
        ("max_prompts", -3, "max_prompts must be at least 1 (null: every prompt), got -3."),
        ("batch_size", 0, "batch_size must be at least 1, got 0."),
        ("batch_size", -2, "batch_size must be at least 1, got -2."),
    ],
)
def test_a_size_below_1_is_refused_alike_by_evaluate_landscape_and_pairs(
    setting, value, message, stage_outputs, task_files, tmp_path
):
    """``max_prompts``: 0 crashed in torch.cat after the models loaded; -3 silently dropped the
    last 3. ``batch_size``: 0 ended in a traceback once the models were loaded (range() arg 3
    must not be zero), -2 in another (zip() argument 2 is shorter than argument 1)."""
    val, sft = str(task_files["prompts_val"]), str(stage_outputs["sft-1"])
    match, size = re.escape(message), {setting: value}
    with pytest.raises(SalsaError, match=match):
        evaluate({"a": sft}, {"val": val}, str(tmp_path / "e"), **size)
    with pytest.raises(SalsaError, match=match):
        landscape([sft, str(stage_outputs["sft-2"])], val, str(tmp_path / "l"), **size)
    with pytest.raises(SalsaError, match=match):
        sampled_pairs(sft, val, str(tmp_path / "p"), **size)
    assert not list(tmp_path.iterdir())
    assert len(load_prompts(val, limit=3)) == 3 and len(load_prompts(val)) > 3


def test_evaluate_refuses_no_models_or_no_prompt_sets(stage_outputs, task_files, tmp_path):
    """Either one empty wrote an evaluation of nothing (a report with an empty table)."""
    val, sft = str(task_files["prompts_val"]), str(stage_outputs["sft-1"])
    match = r"models must be at least one \{name: model directory\}, got \{\}\."
    with pytest.raises(SalsaError, match=match):
        evaluate({}, {"val": val}, str(tmp_path / "e"))
    match = r"prompts must be at least one \{set name: prompt file\}, got \{\}\."
    with pytest.raises(SalsaError, match=match):
        evaluate({"a": sft}, {}, str(tmp_path / "e"))
    assert not list(tmp_path.iterdir())


def test_evaluate_refuses_a_group_column_rows_lack_before_generating(
    stage_outputs, task_files, tmp_path
):
    """A misspelt ``group_column`` was ignored: the report came without its breakdown and
    nothing said why."""
    val, sft = str(task_files["prompts_val"]), str(stage_outputs["sft-1"])
    n = len(load_prompts(val))
    match = rf"prompts_val\.jsonl': no value in group_column 'famly' in {n} of {n} row\(s\) \(first: row 1, whose columns are \[.*'family'.*\]\); .*--group_column null"
    with pytest.raises(SalsaError, match=match):
        evaluate({"a": sft}, {"val": val}, str(tmp_path / "e"), group_column="famly")
    rows = [json.loads(line) for line in Path(val).read_text().splitlines()[:3]]
    del rows[2]["family"]
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(json.dumps(r) + "\n" for r in rows))
    match = r"partial\.jsonl': no value in group_column 'family' in 1 of 3 row\(s\) \(first: row 3"
    with pytest.raises(SalsaError, match=match):
        evaluate({"a": sft}, {"val": str(partial)}, str(tmp_path / "e"), group_column="family")
    assert not (tmp_path / "e").exists()


def test_evaluate_refuses_unknown_pair_before_generating(stage_outputs, task_files, tmp_path):
    with pytest.raises(SalsaError, match=r"pairs entry \['a', 'nope'\]"):
        evaluate(
            models={"a": str(stage_outputs["sft-1"])},
            prompts={"val": str(task_files["prompts_val"])},
            output=str(tmp_path / "eval"),
            pairs=[["a", "nope"]],
        )
    assert not (tmp_path / "eval").exists()


def test_landscape_alpha_line_ends_are_the_sft_models(stage_outputs, task_files, tmp_path):
    out = stage_outputs
    result = landscape(
        [str(out["sft-1"]), str(out["sft-2"])],
        str(task_files["prompts_val"]),
        output=str(tmp_path / "land"),
        reward_model=str(out["reward"]),
        points=3,
        max_prompts=16,
        generation=GEN,
        batch_size=8,
    )
    assert [p["weights"] for p in result["points"]] == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    single = evaluate(
        models={"sft-1": str(out["sft-1"])},
        prompts={"val": str(task_files["prompts_val"])},
        output=str(tmp_path / "eval"),
        reward_model=str(out["reward"]),
        max_prompts=16,
        generation=GEN,
        batch_size=8,
    )["sets"]["val"]["models"]["sft-1"]
    # alpha = 1 is sft-1 itself: same weights, same sampling noise, same rewards.
    assert result["points"][-1]["score"] == pytest.approx(single["score"]["mean"], abs=1e-5)
    assert result["points"][-1]["gold"] == pytest.approx(single["gold"]["mean"], abs=1e-6)
    assert json.loads((tmp_path / "land/landscape.json").read_text())["points"] == result["points"]
    assert (tmp_path / "land/landscape.png").stat().st_size > 0

    # The same output again: refused before any soup is sampled, the first result kept.
    written = (tmp_path / "land/landscape.json").read_text()
    match = r"landscape output '.*land' already holds files\. .* --overwrite true to replace it"
    with pytest.raises(SalsaError, match=match):
        landscape([str(out["sft-1"]), str(out["sft-2"])], str(task_files["prompts_val"]),
                  output=str(tmp_path / "land"))  # fmt: skip
    assert (tmp_path / "land/landscape.json").read_text() == written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".land")] == []


def test_landscape_bad_inputs(stage_outputs, task_files, tmp_path):
    prompts = str(task_files["prompts_val"])
    with pytest.raises(SalsaError, match="2 checkpoints .* or 3 .* got 1"):
        landscape([str(stage_outputs["sft-1"])], prompts, output=str(tmp_path / "a"))
    (tmp_path / "afile").write_text("")
    with pytest.raises(SalsaError, match=r"landscape output '.*afile' is a file, not a directory"):
        landscape([str(stage_outputs["sft-1"]), str(stage_outputs["sft-2"])], prompts,
                  output=str(tmp_path / "afile"))  # fmt: skip
    torch.manual_seed(0)
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        )
    )
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(SalsaError, match="other"):
        landscape(
            [str(stage_outputs["sft-1"]), str(tmp_path / "other")], prompts,
            output=str(tmp_path / "b"),
        )  # fmt: skip


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--points", "1"], "points must be at least 2 (the line's two ends), got 1."),
        (["--checkpoints+", "{sft-2}", "--resolution", "0"], "resolution must be at least 1, got 0."),
        (["--checkpoints", "{sft-1},{sft-2}"], "got 1: ['{sft-1},{sft-2}'] (separate them with "
         "spaces: --checkpoints A B)."),
    ],
)  # fmt: skip
def test_landscape_flags_are_refused_by_their_names(
    flags, message, stage_outputs, task_files, tmp_path, capsys
):
    """The messages named the functions behind the flags (``alpha_line needs n_points >= 2``);
    a comma-separated list, as the usage line ``[ITEM,...]`` suggests, was "got 1" alone."""
    sft = {k: str(stage_outputs[k]) for k in ("sft-1", "sft-2")}
    argv = ["landscape", "--checkpoints", sft["sft-1"], sft["sft-2"],
            "--prompts", str(task_files["prompts_val"]), "--output", str(tmp_path / "land")]  # fmt: skip
    assert main(argv + [f.format(**sft) if "{" in f else f for f in flags]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and line.endswith(message.format(**sft))
    assert not list(tmp_path.iterdir())


def test_a_mapping_flag_without_spaces_after_its_colons_is_refused_with_the_fix(tmp_path, capsys):
    """YAML reads ``{a:x}`` as one key with no value; jsonargparse said only "Expected a <class
    'dict'>"."""
    argv = ["evaluate", "--models", "{a:x,b:y}", "--prompts", "{val: p.jsonl}",
            "--output", str(tmp_path / "e")]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --models {a:x,b:y}: YAML needs a space after each colon of a mapping: {a: x,b: y}"
    )
    assert not list(tmp_path.iterdir())


def test_overwrite_is_taken_alone_or_with_true_by_every_command(
    stage_outputs, task_files, tmp_path, monkeypatch, capsys
):
    """``salsa soup``, ``convert`` and ``configs copy`` took ``--overwrite`` alone ("unrecognized
    arguments: true" after it), ``evaluate``, ``landscape`` and ``pairs`` only with a value
    ("expected one argument" without): a user who learned one form was refused the other."""
    monkeypatch.chdir(tmp_path)
    sft = [str(stage_outputs["sft-1"]), str(stage_outputs["sft-2"])]
    soup = ["--checkpoints", *sft, "--output", "soup"]
    evaluate = ["--models", f"{{a: {sft[0]}}}", "--output", "eval",
                "--prompts", f"{{val: {task_files['prompts_val']}}}", "--max_prompts", "2"]  # fmt: skip
    for command, args in (
        (["soup"], soup),
        (["evaluate"], evaluate),
        (["configs", "copy"], ["sft.yaml"]),
    ):
        assert main([*command, *args]) == 0
        assert main([*command, *args]) == 2  # there already
        assert main([*command, *args, "--overwrite", "false"]) == 2
        assert main([*command, *args, "--overwrite", "true"]) == 0
        assert main([*command, *args, "--overwrite"]) == 0
        assert main([*command, "--overwrite", *args]) == 0
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err and "expected one argument" not in err


def test_a_pipeline_yaml_given_to_a_stage_and_a_stage_yaml_to_the_pipeline_say_which_to_run(
    tmp_path, capsys
):
    """``salsa fit --config experiment.yaml`` said only "Subcommand 'fit' does not accept option
    'report.methods.salsa-a0.3.models'"; ``salsa pipeline --config sft.yaml`` "lists no
    stages"."""
    pipeline, stage = CONFIGS / "experiment.yaml", CONFIGS / "sft.yaml"
    for command in (["fit"], ["evaluate"]):
        assert main([*command, "--config", str(pipeline)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: {pipeline} is a pipeline YAML (it lists stages), not a config of salsa "
            f"{command[0]}: run it with `salsa pipeline --config {pipeline}`."
        )
    assert main(["pipeline", "--config", str(stage), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: pipeline '{stage}' lists no stages: it is a config of salsa fit, run it with "
        f"`salsa fit --config {stage}`."
    )
    assert not list(tmp_path.iterdir())


def test_pipeline_refuses_a_missing_input_before_running(tmp_path):
    stages = [
        Stage(
            name="soup",
            command="soup",
            configs=["soup.yaml"],
            inputs=["artifacts/sft-1"],
            outputs=["artifacts/soup"],
        ),
    ]
    with pytest.raises(SalsaError, match=r"stage 'soup' reads 'artifacts/sft-1'.*earlier stage"):
        run_pipeline(CONFIGS / "quickstart.yaml", tmp_path / "run", stages=stages)
    assert not (tmp_path / "run").exists()


def test_quickstart_into_a_file_is_refused_before_any_stage_runs(tmp_path, capsys):
    """It failed in mkdir, after the plan was checked, with a FileExistsError traceback (and a
    FileNotFoundError one where the permission bits allow what mkdir then refuses: /proc)."""
    (tmp_path / "afile").write_text("keep")
    assert main(["quickstart", "--output", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: the pipeline's output directory (--output) '{tmp_path / 'afile'}' is a file" in err
    )
    assert "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "keep"
    with pytest.raises(SalsaError, match=r"'.*afile/run' cannot be created: '.*afile' is a file"):
        run_pipeline(CONFIGS / "quickstart.yaml", tmp_path / "afile" / "run")
    if os.path.isdir("/proc"):  # root may write there by the permission bits; mkdir fails
        with pytest.raises(SalsaError, match=r"'/proc/salsa-run' cannot be (created|written)"):
            run_pipeline(CONFIGS / "quickstart.yaml", "/proc/salsa-run")


PIPELINES = sorted(p for p in CONFIGS.rglob("*.yaml") if "\nstages:" in "\n" + p.read_text())


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_pipeline_yaml_chains_its_stages_and_its_report(path, tmp_path):
    """Given only what no stage makes (the converted model, the task's files), every stage's
    inputs exist or come from an earlier stage, its YAMLs exist, and the report section parses."""
    import yaml

    from salsa_lightning.pipeline import check_plan
    from salsa_lightning.report import ReportSpec

    spec = yaml.safe_load(path.read_text())
    stages = [Stage(**s) for s in spec["stages"]]
    made = {out for s in stages for out in s.outputs}
    given = {i for s in stages for i in s.inputs} - made
    assert given <= {"artifacts/smollm2", "artifacts/task"}  # a misspelt input shows up here
    for name in given:
        (tmp_path / name).mkdir(parents=True)
    check_plan(stages, tmp_path, path.parent)
    pipeline.check_waitable(stages)  # it runs on several processes too
    if spec.get("report"):
        ReportSpec.from_yaml(spec["report"])


LAUNCHERS = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK",
             "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_PROCID", "SLURM_JOB_NAME",
             "NODE_RANK")  # fmt: skip


@pytest.fixture
def no_launcher(monkeypatch):
    """This process as if no launcher had started it, whatever runs pytest; waits poll fast."""
    for key in LAUNCHERS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(pipeline, "POLL_SECONDS", 0.05)


@pytest.mark.parametrize(
    "env, rank",
    [
        ({}, None),
        ({"TORCHELASTIC_RUN_ID": "r", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
          "GROUP_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 3),
        ({"TORCHELASTIC_RUN_ID": "r", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
          "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "1"}, None),
        ({"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_PROCID": "5",
          "SLURM_JOB_NAME": "salsa"}, 5),
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_NAME": "salsa"}, None),
        ({"NODE_RANK": "1"}, 1),
        ({"NODE_RANK": "0"}, 0),
    ],
    ids=["alone", "torchrun", "torchrun-one", "srun", "sbatch-one-task", "node-1", "node-0"],
)  # fmt: skip
def test_the_pipeline_reads_its_rank_as_lightning_reads_the_launchers(
    no_launcher, monkeypatch, env, rank
):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert pipeline.pipeline_rank() == rank


def soup_inputs(root: Path) -> Path:
    """``root`` with the soup stage's two inputs, empty (only rank 0 would read them)."""
    for name in ("sft-1", "sft-2"):
        (root / "artifacts" / name).mkdir(parents=True)
    return root


def soup_stage() -> Stage:
    return Stage(
        name="soup",
        command="soup",
        configs=["soup.yaml"],
        inputs=["artifacts/sft-1", "artifacts/sft-2"],
        outputs=["artifacts/soup"],
    )


def later(seconds: float, action) -> threading.Thread:
    thread = threading.Timer(seconds, action)
    thread.start()
    return thread


def test_a_rank_other_than_0_waits_for_what_rank_0_runs_alone(
    no_launcher, tmp_path, monkeypatch, capsys
):
    """Under torchrun or srun every rank ran the soup and evaluation stages: each built the
    soup (a 7B soup once per device) and wrote the same files, and a rank that found the
    output half-way could stop on it. Now rank 1 waits for rank 0's outputs and runs nothing."""
    monkeypatch.setenv("NODE_RANK", "1")
    root = soup_inputs(tmp_path / "run")  # never read: rank 1 does not run the soup
    writer = later(0.5, lambda: (root / "artifacts" / "soup").mkdir())
    run_pipeline(CONFIGS / "quickstart.yaml", root, stages=[soup_stage()])
    writer.join()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "[rank: 1] [1/1] soup: salsa soup runs on rank 0 alone; waiting for artifacts/soup"
    )
    assert re.fullmatch(r"\[rank: 1\] \[1/1\] soup: written by rank 0 after \d+ s", out[1])
    assert len(out) == 2  # no "salsa soup ..." line: it did not run here
    assert sorted(p.name for p in (root / "artifacts").iterdir()) == ["sft-1", "sft-2", "soup"]
    assert not list((root / "artifacts" / "soup").iterdir())  # the empty one "rank 0" made


def test_a_waiting_rank_stops_when_rank_0_stopped_and_rank_0_says_so(
    no_launcher, tmp_path, monkeypatch
):
    root = soup_inputs(tmp_path / "run")
    # Rank 0: the soup of two empty directories fails, and the marker names the stage.
    monkeypatch.setenv("NODE_RANK", "0")
    (root / pipeline.STOPPED_MARKER).write_text("left by an earlier run\n")
    with pytest.raises(SalsaError, match="stage 'soup' failed"):
        run_pipeline(CONFIGS / "quickstart.yaml", root, stages=[soup_stage()])
    stopped = (root / pipeline.STOPPED_MARKER).read_text()
    assert stopped.startswith("stage 'soup': stage 'soup' failed (exit status 2)")
    # Rank 1, started before rank 0 wrote it: stops, naming what rank 0 wrote.
    (root / pipeline.STOPPED_MARKER).unlink()
    monkeypatch.setenv("NODE_RANK", "1")
    writer = later(0.3, lambda: (root / pipeline.STOPPED_MARKER).write_text(stopped))
    with pytest.raises(SalsaError, match=r"\[1/1\] soup: rank 0 stopped \(stage 'soup': stage"):
        run_pipeline(CONFIGS / "quickstart.yaml", root, stages=[soup_stage()])
    writer.join()
    # A marker older than this run (an earlier run's) is not read as this run's stop.
    os.utime(root / pipeline.STOPPED_MARKER, (1, 1))
    later(0.3, lambda: (root / "artifacts" / "soup").mkdir()).join()
    run_pipeline(CONFIGS / "quickstart.yaml", root, stages=[soup_stage()])


def test_a_waiting_rank_stops_when_rank_0_falls_silent(no_launcher, tmp_path, monkeypatch, capsys):
    """Rank 0 killed (the out-of-memory killer, a lost node) writes neither the outputs nor the
    stop marker; under srun without --kill-on-bad-exit, or one pipeline per node, the others
    waited until the job's time limit. Now they wait while rank 0's heartbeat changes, and stop
    once it has not changed for SILENT_SECONDS."""
    monkeypatch.setattr(pipeline, "SILENT_SECONDS", 1.0)
    monkeypatch.setenv("NODE_RANK", "1")
    root = soup_inputs(tmp_path / "run")
    alive = threading.Event()

    def rank_0() -> None:  # beats for 2.4 s (longer than SILENT_SECONDS), then is "killed"
        for count in range(48):
            (root / pipeline.HEARTBEAT).write_text(f"{count}\n")
            alive.set()
            time.sleep(0.05)

    beating = threading.Thread(target=rank_0)
    beating.start()
    alive.wait()
    start = time.monotonic()
    monkeypatch.setattr(pipeline, "STILL_WAITING_SECONDS", 1.0)
    with pytest.raises(SalsaError, match=r"\[1/1\] soup: rank 0 has given no sign of life for 1 s"):
        run_pipeline(CONFIGS / "quickstart.yaml", root, stages=[soup_stage()])
    beating.join()
    assert time.monotonic() - start >= 2.3 + 1.0  # it waited while rank 0 was alive
    # ... saying so every STILL_WAITING_SECONDS (a 7B evaluation on rank 0 takes hours)
    said = [line for line in capsys.readouterr().out.splitlines() if "still waiting" in line]
    assert said and all(
        re.fullmatch(r"\[rank: 1\] \[1/1\] soup: still waiting for artifacts/soup after \d+ s; "
                     r"rank 0's last heartbeat \d+ s ago", line) for line in said
    )  # fmt: skip
    assert not (root / "artifacts" / "soup").exists()
    # No heartbeat at all (rank 0 gone before it began): it stops after SILENT_SECONDS too.
    (root / pipeline.HEARTBEAT).unlink()
    with pytest.raises(SalsaError, match="no sign of life"):
        run_pipeline(CONFIGS / "quickstart.yaml", root, stages=[soup_stage()])


def test_rank_0_beats_while_its_pipeline_runs_and_removes_the_heartbeat_after(
    no_launcher, tmp_path, monkeypatch
):
    monkeypatch.setattr(pipeline, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.chdir(tmp_path)
    heartbeat = tmp_path / pipeline.HEARTBEAT
    with pipeline.beating(0):
        seen = set()
        for _ in range(20):
            seen.add(heartbeat.read_text())
            time.sleep(0.02)
        assert len(seen) >= 3  # rewritten as it runs
    assert not heartbeat.exists()
    for rank in (None, 1):  # alone, or another rank: no heartbeat
        with pipeline.beating(rank):
            time.sleep(0.1)
            assert not heartbeat.exists()
    # Rank 0 of a real pipeline: its soup fails; the heartbeat is gone, the marker written.
    monkeypatch.setenv("NODE_RANK", "0")
    root = soup_inputs(tmp_path / "run")
    with pytest.raises(SalsaError, match="stage 'soup' failed"):
        run_pipeline(CONFIGS / "quickstart.yaml", root, stages=[soup_stage()])
    assert not (root / pipeline.HEARTBEAT).exists() and (root / pipeline.STOPPED_MARKER).exists()


@pytest.mark.parametrize("node", ["0", "1"])
def test_with_several_processes_a_stage_rank_0_runs_alone_must_name_its_outputs(
    node, no_launcher, tmp_path, monkeypatch
):
    """Without outputs the other ranks could not tell when rank 0 finished it: they would wait
    for rank 0 in the next fit's rendezvous, which times out (30 minutes). Refused on every rank
    before anything is written; alone, the same stage runs as before."""
    monkeypatch.setenv("NODE_RANK", node)
    stage = soup_stage()
    stage.outputs = []
    soup_inputs(tmp_path / "run")
    with pytest.raises(SalsaError, match=r"stage 'soup' \(salsa soup\) lists no outputs; with"):
        run_pipeline(CONFIGS / "quickstart.yaml", tmp_path / "run", stages=[stage])
    assert sorted(p.name for p in (tmp_path / "run" / "artifacts").iterdir()) == ["sft-1", "sft-2"]
    monkeypatch.delenv("NODE_RANK")
    with pytest.raises(SalsaError, match="stage 'soup' failed"):  # alone: it runs (and fails
        run_pipeline(CONFIGS / "quickstart.yaml", tmp_path / "run", stages=[stage])  # on these)


def test_fit_args_end_every_fit_stage_and_reach_no_other(
    stage_outputs, task_dir, tmp_path, monkeypatch
):
    """``--fit-args`` (e.g. the strategy and devices of a multi-device run): added after each
    fit stage's own arguments, so they win; its ``--config`` files found from where the command
    runs, though the stages run from the output directory; the soup takes none of them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("trainer: {max_steps: 1}\n")
    soup = Stage(
        name="soup", command="soup", configs=["soup.yaml"],
        args=["--checkpoints", str(stage_outputs["sft-1"]), str(stage_outputs["sft-2"]),
              "--output", "artifacts/soup"],
        outputs=["artifacts/soup"],
    )  # fmt: skip
    sft = Stage(
        name="sft", command="fit", configs=["sft.yaml"],
        args=["--model.init_args.export_dir", "artifacts/sft", "--data.init_args.task_dir",
              str(task_dir), "--trainer.accelerator", "cpu", "--trainer.max_steps", "3",
              "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
              "--data.init_args.max_samples", "16", "--data.init_args.batch_size", "4"],
        outputs=["artifacts/sft"],
    )  # fmt: skip
    fit_args = ["--config", "mine.yaml", "--model.init_args.export_dir", "artifacts/sft-2"]
    root = run_pipeline(CONFIGS / "quickstart.yaml", "run", [soup, sft], fit_args=fit_args)
    assert (root / "artifacts" / "soup" / "model.safetensors").is_file()
    assert (root / "artifacts" / "sft-2" / "model.safetensors").is_file()
    assert not (root / "artifacts" / "sft").exists()
    (last,) = root.rglob("last.ckpt")
    assert torch.load(last, weights_only=False)["global_step"] == 1  # mine.yaml's max_steps
    with pytest.raises(SalsaError, match="'missing.yaml' is neither a file here nor a packaged"):
        run_pipeline(
            CONFIGS / "quickstart.yaml", "run-2", [soup], fit_args=["--config", "missing.yaml"]
        )
    assert not (tmp_path / "run-2").exists()


@pytest.mark.parametrize("parser", [pipeline_parser, quickstart_parser])
def test_fit_args_takes_one_option_as_its_value(parser, capsys):
    """``--fit-args --trainer.devices=8`` (one option, no quotes needed) is the value, as
    ``--fit-args=...`` is; the command's own options after ``--fit-args`` stay its own."""
    for argv, fit_args in [
        (["--fit-args", "--trainer.devices=8"], "--trainer.devices=8"),
        (["--fit-args", "--config fsdp.yaml --trainer.devices 2"], "--config fsdp.yaml --trainer.devices 2"),
        (["--fit-args=--trainer.devices=8"], "--trainer.devices=8"),
    ]:  # fmt: skip
        args = parse_with_fit_args(parser(), ["--config", "x.yaml", *argv, "--output", "o"])
        assert (args.fit_args, args.config, args.output) == (fit_args, "x.yaml", "o")
    with pytest.raises(SystemExit):  # --output is the command's: --fit-args has no value
        parse_with_fit_args(parser(), ["--config", "x.yaml", "--fit-args", "--output", "o"])
    assert "argument --fit-args: expected one argument" in capsys.readouterr().err


def test_stages_selects_by_name_pattern_in_pipeline_order_and_checks_the_rest(tmp_path):
    import yaml

    spec = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
    stages = [Stage(**s) for s in spec["stages"]]
    picked = select_stages(stages, ["salsa (*", "sft-1"])
    assert [s.name for s in picked] == [
        "sft-1", "salsa (seed 1)", "salsa (seed 2)", "salsa (seed 3)"
    ]  # fmt: skip
    with pytest.raises(SalsaError, match=r"--stages 'ppo-\*' matches no stage.*'ppo \(seed 1\)'"):
        run_pipeline(CONFIGS / "quickstart.yaml", tmp_path / "run", only=["ppo-*"])
    # soup alone: sft-1 is another stage's output, so it must exist already
    with pytest.raises(SalsaError, match=r"stage 'soup' reads 'artifacts/sft-1'"):
        run_pipeline(CONFIGS / "quickstart.yaml", tmp_path / "run", only=["soup"])
    assert not (tmp_path / "run").exists()


def test_pipeline_runs_stages_and_skips_finished_ones(stage_outputs, tmp_path, capsys):
    root = tmp_path / "run"
    for name in ("sft-1", "sft-2"):
        shutil.copytree(stage_outputs[name], root / "artifacts" / name)
    stages = [
        Stage(
            name="soup",
            command="soup",
            configs=["soup.yaml"],
            inputs=["artifacts/sft-1", "artifacts/sft-2"],
            outputs=["artifacts/soup"],
        )
    ]
    run_pipeline(CONFIGS / "quickstart.yaml", root, stages=stages)
    recipe = json.loads((root / "artifacts/soup/soup_recipe.json").read_text())
    assert recipe["weights"] == [0.5, 0.5]
    mtime = (root / "artifacts/soup/model.safetensors").stat().st_mtime_ns
    run_pipeline(CONFIGS / "quickstart.yaml", root, stages=stages)
    assert "done already" in capsys.readouterr().out
    assert (root / "artifacts/soup/model.safetensors").stat().st_mtime_ns == mtime


def test_reward_at_matched_kl_interpolates():
    curve = [(0.0, 0.0), (2.0, 1.0)]
    assert interpolate(curve, 0.5) == pytest.approx(0.25)
    assert interpolate(curve, 3.0) is None
    other = [(1.0, 2.0), (3.0, 4.0)]
    table = frontier({"a": [curve], "b": [other]}, n=2)
    # Only the KL range both runs cover, [1, 2], is compared.
    assert table["kl"] == [1.0, 2.0]
    assert table["a"]["mean"] == [pytest.approx(0.5), pytest.approx(1.0)]
    assert table["b"]["mean"] == [pytest.approx(2.0), pytest.approx(3.0)]


def test_the_frontier_sorts_each_run_by_kl_and_bands_the_seeds():
    """A run's KL does not grow monotonically: points in step order zigzag, sorted they do not.
    Two seeds give a band from the lower to the higher at each matched KL."""
    zigzag = [(0.0, 0.0), (2.0, 2.0), (1.0, 1.0)]  # step order
    assert interpolate(zigzag, 1.5) == pytest.approx(1.5)  # on the sorted curve
    seeds = [[(0.0, 0.0), (2.0, 2.0)], [(0.0, 1.0), (2.0, 3.0)]]
    table = frontier({"m": seeds}, n=3)
    assert table["kl"] == [0.0, 1.0, 2.0]
    assert table["m"]["mean"] == [pytest.approx(0.5), pytest.approx(1.5), pytest.approx(2.5)]
    assert table["m"]["low"] == [0.0, 1.0, 2.0] and table["m"]["high"] == [1.0, 2.0, 3.0]


def test_landscape_command_takes_checkpoints_shell_style(stage_outputs, task_files, tmp_path):
    """``salsa landscape --checkpoints A B ...``, as the README writes it."""
    from salsa_lightning.cli import main

    code = main(
        [
            "landscape",
            "--checkpoints", str(stage_outputs["sft-1"]), str(stage_outputs["sft-2"]),
            "--prompts", str(task_files["prompts_val"]),
            "--points", "2",
            "--max_prompts", "4",
            "--output", str(tmp_path / "land"),
        ]
    )  # fmt: skip
    assert code == 0
    points = json.loads((tmp_path / "land/landscape.json").read_text())["points"]
    assert [p["weights"] for p in points] == [[0.0, 1.0], [1.0, 0.0]]


@pytest.mark.slow
def test_a_two_process_stage_runs_alone_and_each_later_stage_runs_once(
    stage_outputs, task_dir, tmp_path
):
    """The process Lightning starts for a stage's second device runs that stage and exits: it
    does not run the pipeline again, and with it every later stage beside this process (a
    soup written twice at once, a 1-process fit joined by a second rank). A second 2-process
    stage then starts its own processes afresh."""
    import yaml
    from test_fsdp import run

    root = tmp_path / "run"
    shutil.copytree(stage_outputs["sft-1"], root / "artifacts" / "sft-1")

    def fit(name: str, devices: int) -> dict:
        args = [
            "--data.init_args.task_dir", str(task_dir), "--data.init_args.max_samples", "64",
            "--data.init_args.batch_size", "8", "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices > 1 else "auto",
            "--model.init_args.export_dir", f"artifacts/{name}",
            "--trainer.logger.init_args.name", name,
        ]  # fmt: skip
        configs = [str(CONFIGS / "sft.yaml")]
        return {"name": name, "command": "fit", "configs": configs, "args": args,
                "outputs": [f"artifacts/{name}"]}  # fmt: skip

    soup = {
        "name": "soup",
        "command": "soup",
        "args": ["--checkpoints", "artifacts/sft-1", "artifacts/a", "--output", "artifacts/soup"],
        "outputs": ["artifacts/soup"],
    }
    stages = [fit("a", 2), soup, fit("b", 2), fit("c", 1)]
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"stages": stages}))
    out = run(
        ["pipeline", "--config", str(tmp_path / "pipeline.yaml"), "--output", str(root)], tmp_path
    )
    for i, stage in enumerate(stages, 1):
        assert out.count(f"[{i}/4] {stage['name']}: salsa") == 1, out
        assert out.count(f"[{i}/4] {stage['name']}: finished") == 1, out
    for name in ("a", "b", "c", "soup"):
        assert (root / "artifacts" / name / "model.safetensors").is_file()
