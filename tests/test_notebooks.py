"""The notebooks in notebooks/: committed without outputs, and they run top to bottom.

The execution test runs both notebooks with nbclient in one temporary WORKDIR (the second reuses
the first's SFT and reward models) with ``SALSA_NOTEBOOK_FAST=1``, then checks the files they
write. It takes a few minutes on 2 CPU cores, hence ``slow``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = ("landscape.ipynb", "salsa_vs_ppo.ipynb")  # in execution order
RUNS = ("ppo", "salsa-2", "salsa-3", "multiple-kl")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_committed_clean(name: str) -> None:
    """nbformat v4, valid, no outputs, no execution counts; starts with markdown + parameters."""
    path = NOTEBOOKS / name
    raw = json.loads(path.read_text())
    assert raw["nbformat"] == 4
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {i} has outputs; clear them before committing"
            assert cell.execution_count is None, f"{name} cell {i} has an execution count"
    assert nb.cells[0].cell_type == "markdown"
    params = nb.cells[1]
    assert params.cell_type == "code"
    assert 'os.environ.get("SALSA_NOTEBOOK_DIR", "notebook-artifacts")' in params.source
    assert 'os.environ.get("SALSA_NOTEBOOK_FAST") == "1"' in params.source
    assert nb.metadata.kernelspec.name == "python3"


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


@pytest.mark.slow
def test_notebooks_execute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbclient = pytest.importorskip("nbclient")
    workdir = tmp_path / "work"
    monkeypatch.setenv("SALSA_NOTEBOOK_DIR", str(workdir))
    monkeypatch.setenv("SALSA_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        client = nbclient.NotebookClient(
            nb,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": str(tmp_path)}},
        )
        client.execute()  # raises CellExecutionError on the first failing cell
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
                assert not errors, f"{name} cell {i}: {errors[0].get('ename')}"
        # The notebook's own outputs are not written back to the repo.
        saved = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert all(c.get("outputs", []) == [] for c in saved.cells if c.cell_type == "code")
    root = workdir / "artifacts"

    # landscape.ipynb: the alpha line (11 points) and the triangle, with finite rewards.
    line = json.loads((root / "landscape/line/landscape.json").read_text())
    assert len(line["points"]) == 11
    alphas = [p["weights"][0] for p in line["points"]]
    assert alphas[0] == 0.0 and alphas[-1] == 1.0 and alphas == sorted(alphas)
    assert all(_finite(p["score"]) and _finite(p["gold"]) for p in line["points"])
    triangle = json.loads((root / "landscape/triangle/landscape.json").read_text())
    assert len(triangle["checkpoints"]) == 3
    assert len(triangle["points"]) >= 10  # (r + 1)(r + 2) / 2 with r >= 3
    for p in triangle["points"]:
        assert len(p["weights"]) == 3 and abs(sum(p["weights"]) - 1) < 1e-6
        assert _finite(p["score"]) and _finite(p["gold"])
    for part in ("line", "triangle"):
        assert (root / f"landscape/{part}/landscape.png").stat().st_size > 5000

    # salsa_vs_ppo.ipynb: four runs exported with a KL-reward curve each, one evaluation.
    from salsa_lightning.report import eval_curve

    for run in RUNS:
        assert (root / run / "config.json").is_file(), f"{run} was not exported"
        curve = eval_curve(root / "logs" / run)
        assert len(curve) >= 2, f"{run}: {len(curve)} validation points"
        assert all(_finite(r["eval/kl"]) and _finite(r["eval/score"]) for r in curve)
    results = json.loads((root / "eval-salsa-vs-ppo/results.json").read_text())
    assert set(results["sets"]) == {"in_distribution", "out_of_distribution"}
    for res in results["sets"].values():
        assert set(RUNS) <= set(res["models"])
        for run in RUNS:
            assert _finite(res["models"][run]["score"]["mean"])
        for run in RUNS[1:]:
            assert 0.0 <= res["win_rates"][f"{run}_vs_ppo/score"]["mean"] <= 1.0
    for run in RUNS:
        rows = (root / f"eval-salsa-vs-ppo/answers/in_distribution/{run}.jsonl").read_text()
        assert len(rows.splitlines()) == 16  # EVAL_PROMPTS in FAST mode
    for fig in ("reward_distributions", "kl_reward", "salsa_n"):
        assert (workdir / "figures" / f"{fig}.png").stat().st_size > 10000, fig
