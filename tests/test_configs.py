"""Every LightningCLI YAML under configs/ parses and instantiates with SalsaCLI, into the classes
and settings it names. Files that are not LightningCLI configs (no top-level ``model:`` with a
``class_path``, e.g. ``configs/soup.yaml``) are skipped. The same YAMLs are the packaged ones: a
``--config`` name finds them from any directory, and ``salsa configs list|copy`` show and copy
them."""

from __future__ import annotations

import importlib
from dataclasses import asdict, is_dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BASE, CONFIGS, REPO

import salsa_lightning
from salsa_lightning import embedded
from salsa_lightning.cli import main
from salsa_lightning.finetune import FineTuneModule
from salsa_lightning.lightning_cli import SalsaCLI


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text("utf-8")) or {}


def is_cli_config(path: Path) -> bool:
    doc = load_yaml(path)
    return (
        isinstance(doc, dict)
        and isinstance(doc.get("model"), dict)
        and "class_path" in doc["model"]
    )


ALL_YAML = sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml"))
CLI_CONFIGS = [p for p in ALL_YAML if is_cli_config(p)]


def resolve(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def assert_subset(expected, actual, where: str) -> None:
    """Every setting the YAML names is in ``actual`` (which may add defaults)."""
    if isinstance(expected, dict):
        actual = asdict(actual) if is_dataclass(actual) else actual
        assert isinstance(actual, dict), where
        for key, value in expected.items():
            assert key in actual, f"{where}.{key}"
            assert_subset(value, actual[key], f"{where}.{key}")
    else:
        assert actual == expected, where


def is_paper(path: Path) -> bool:
    return "paper" in path.relative_to(CONFIGS).parts


def test_config_discovery():
    names = {p.relative_to(CONFIGS).as_posix() for p in CLI_CONFIGS}
    assert {"base.yaml", "sft.yaml", "reward.yaml"} <= names
    assert "soup.yaml" not in names


@pytest.mark.parametrize("path", CLI_CONFIGS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_config_instantiates(path: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc = load_yaml(path)
    model_args = dict(doc["model"].get("init_args") or {})
    data_args = dict((doc.get("data") or {}).get("init_args") or {})
    overrides: list[str] = []
    overridden: set[str] = set()
    if is_paper(path):
        # real paper models are hub ids: swap in the tiny local base to build it offline
        if model_args.get("model") is not None:
            overrides += ["--model.init_args.model", str(BASE)]
            overridden.add("model")
        if "tokenizer" in data_args or "data" in doc:
            overrides += ["--data.init_args.tokenizer", str(BASE)]
            overridden.add("tokenizer")

    cli = SalsaCLI(args=["--config", str(path), *overrides], run=False)

    assert type(cli.model) is resolve(doc["model"]["class_path"])
    if "data" in doc:
        assert type(cli.datamodule) is resolve(doc["data"]["class_path"])
    if "seed_everything" in doc:
        assert cli.config["seed_everything"] == doc["seed_everything"]
    for key in ("max_epochs", "max_steps", "accumulate_grad_batches"):
        if key in (doc.get("trainer") or {}):
            assert getattr(cli.trainer, key) == doc["trainer"][key]

    # the settings the YAML names reach the objects (export_dir above all)
    hp = cli.model.hparams
    for key, value in model_args.items():
        if key in overridden or key == "optimizer" or key not in hp:
            continue
        assert_subset(value, hp[key], key)
    if "export_dir" in model_args:
        assert hp["export_dir"] == model_args["export_dir"]
    if isinstance(cli.model, FineTuneModule) and "model" not in overridden:
        from_config = model_args.get("model_config") is not None
        expected = None if from_config else embedded.resolve(model_args.get("model", "embedded"))
        assert cli.model.model_name == expected
    for key, value in data_args.items():
        if key in overridden or key not in cli.datamodule.hparams:
            continue
        assert_subset(value, cli.datamodule.hparams[key], key)
    if "tokenizer" in data_args and "tokenizer" not in overridden:
        assert cli.datamodule.tokenizer_name == embedded.resolve(data_args["tokenizer"])

    optimizer = model_args.get("optimizer")
    if isinstance(optimizer, dict) and isinstance(cli.model, FineTuneModule):
        opt = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(2))])
        assert type(opt) is resolve(optimizer["class_path"])
        for key, value in (optimizer.get("init_args") or {}).items():
            assert opt.defaults[key] == value, key

    if is_paper(path) and isinstance(cli.model, FineTuneModule) and hp.get("model_config") is None:
        cli.model.configure_model()
        assert cli.model.model is not None


def test_cli_overrides_reach_the_objects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = SalsaCLI(
        args=[
            "--config", str(CONFIGS / "sft.yaml"),
            "--model.export_dir", "elsewhere",
            "--model.init_args.lora", "{r: 4, alpha: 8}",
            "--data.init_args.max_length", "32",
            "--seed_everything", "7",
        ],
        run=False,
    )  # fmt: skip
    assert cli.model.hparams.export_dir == "elsewhere"
    assert cli.model.hparams.lora["r"] == 4 and cli.model.hparams.lora["alpha"] == 8
    assert cli.datamodule.hparams.max_length == 32
    assert cli.config["seed_everything"] == 7


def test_unknown_setting_is_rejected(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        SalsaCLI(
            args=["--config", str(CONFIGS / "sft.yaml"), "--model.init_args.no_such", "1"],
            run=False,
        )
    assert "no_such" in capsys.readouterr().err


def test_lora_from_yaml_builds_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = SalsaCLI(
        args=["--config", str(CONFIGS / "sft.yaml"), "--model.init_args.lora", "{r: 4, alpha: 8}"],
        run=False,
    )
    cli.model.configure_model()
    trainable = [n for n, p in cli.model.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert cli.model.model.peft_config["default"].r == 4


@pytest.mark.parametrize("stage", ["sft.yaml", "reward.yaml", "salsa.yaml", "ppo.yaml"])
def test_fsdp1_config_stacks_on_every_stage(stage, tmp_path, monkeypatch):
    from salsa_lightning.strategies import FSDP1Strategy

    monkeypatch.chdir(tmp_path)
    args = ["--config", str(CONFIGS / stage), "--config", str(CONFIGS / "fsdp1.yaml")]
    cli = SalsaCLI(args=[*args, "--trainer.accelerator", "cpu"], run=False)
    strategy = cli.trainer.strategy
    assert type(strategy) is FSDP1Strategy
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy._state_dict_type == "sharded"


# ----------------------------------------------------------------------------- packaged configs


def test_the_packaged_configs_are_the_repos_configs():
    """In a checkout the packaged folder is configs/ itself (the wheel maps it in): no YAML
    exists twice."""
    from salsa_lightning.config_files import packaged_dir, packaged_names

    assert packaged_dir() == CONFIGS.resolve()
    assert packaged_names() == sorted(p.relative_to(CONFIGS).as_posix() for p in ALL_YAML)
    assert not (Path(salsa_lightning.__file__).parent / "configs").exists()


def test_pyproject_packages_every_folder_of_the_package():
    """pyproject.toml lists the packages by hand (package-dir maps configs/ in): a new
    subpackage missing from the list would be missing from the wheel."""
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    package = Path(salsa_lightning.__file__).parent
    found = {"salsa_lightning"} | {
        "salsa_lightning." + p.parent.relative_to(package).as_posix().replace("/", ".")
        for p in package.rglob("__init__.py")
        if p.parent != package
    }
    assert found | {"salsa_lightning.configs"} == set(setuptools["packages"])
    assert setuptools["package-dir"] == {"salsa_lightning.configs": "configs"}


def test_a_config_name_finds_the_packaged_yaml_and_says_so(tmp_path, monkeypatch, capsys):
    """From an empty directory: ``sft.yaml`` and ``configs/fsdp1.yaml`` are the packaged files,
    each named in one line on stderr; stdout keeps only the printed config."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:  # --print_config prints, then exits 0
        main(["fit", "--config", "sft.yaml", "--config", "configs/fsdp1.yaml", "--print_config"])
    out, err = capsys.readouterr()
    assert done.value.code in (0, None)
    printed = yaml.safe_load(out)
    assert printed["model"]["class_path"] == "salsa_lightning.SFTModule"
    assert printed["trainer"]["strategy"]["class_path"].endswith("FSDP1Strategy")
    lines = [line for line in err.splitlines() if "using the packaged" in line]
    assert lines == [
        f"--config sft.yaml: using the packaged {CONFIGS / 'sft.yaml'}",
        f"--config configs/fsdp1.yaml: using the packaged {CONFIGS / 'fsdp1.yaml'}",
    ]


def test_a_local_file_wins_over_the_packaged_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    doc = load_yaml(CONFIGS / "sft.yaml")
    doc["trainer"]["max_epochs"] = 7
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(SystemExit):
        main(["fit", "--config", "sft.yaml", "--print_config"])
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["trainer"]["max_epochs"] == 7
    assert "packaged" not in err


def test_an_unknown_config_lists_close_packaged_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", "sfft.yaml"]) == 2
    err = capsys.readouterr().err
    assert "error: config 'sfft.yaml' is neither a file here nor a packaged config" in err
    assert "Close matches: sft.yaml" in err and "salsa configs list" in err
    assert main(["pipeline", "--config", "pipeline.yaml"]) == 2
    assert "Close matches: smollm2/pipeline.yaml" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_packaged_pipeline_reads_its_stage_yamls_from_the_package(tmp_path, monkeypatch, capsys):
    """``salsa pipeline --config configs/smollm2/pipeline.yaml`` from an empty directory: every
    stage YAML is found beside the packaged pipeline, and the plan stops, before any stage
    runs, at the first input nobody writes (the converted model)."""
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "--config", "configs/smollm2/pipeline.yaml"]) == 2
    err = capsys.readouterr().err
    assert f"using the packaged {CONFIGS / 'smollm2/pipeline.yaml'}" in err
    assert "config file" not in err  # every stage YAML was found
    assert "reads 'artifacts/smollm2', which neither exists" in err
    assert not any(tmp_path.iterdir())


def test_configs_list_shows_every_yaml_with_its_first_comment(capsys):
    from salsa_lightning.config_files import first_comment

    assert main(["configs", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{len(ALL_YAML)} packaged configs in {CONFIGS.resolve()}")
    rows = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:]}
    assert set(rows) == {p.relative_to(CONFIGS).as_posix() for p in ALL_YAML}
    assert rows["sft.yaml"] == first_comment(CONFIGS / "sft.yaml")
    assert rows["sft.yaml"].startswith("Stage 1: supervised fine-tuning")
    assert main(["configs"]) == 0  # the list is the default (it was a usage error)
    assert capsys.readouterr().out.splitlines() == lines


def test_configs_copy_a_file_and_a_folder_and_never_overwrites_unasked(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert main(["configs", "copy", "sft.yaml"]) == 0
    assert (tmp_path / "sft.yaml").read_bytes() == (CONFIGS / "sft.yaml").read_bytes()
    assert main(["configs", "copy", "smollm2", "mine"]) == 0
    copied = sorted(
        p.relative_to(tmp_path / "mine").as_posix() for p in (tmp_path / "mine").rglob("*")
    )
    assert copied == ["smollm2"] + sorted(
        f"smollm2/{p.name}" for p in (CONFIGS / "smollm2").glob("*.yaml")
    )
    capsys.readouterr()

    # An edited copy is kept unless --overwrite says otherwise; nothing else is written.
    (tmp_path / "sft.yaml").write_text("edited: true\n")
    (tmp_path / "mine/smollm2/ppo.yaml").write_text("edited: true\n")
    assert main(["configs", "copy", "sft.yaml", "."]) == 2
    assert "sft.yaml already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["configs", "copy", "smollm2", "mine"]) == 2
    assert "already exist; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "sft.yaml").read_text() == "edited: true\n"
    assert (tmp_path / "mine/smollm2/ppo.yaml").read_text() == "edited: true\n"
    assert main(["configs", "copy", "smollm2", "mine", "--overwrite"]) == 0
    ppo = CONFIGS / "smollm2/ppo.yaml"
    assert (tmp_path / "mine/smollm2/ppo.yaml").read_bytes() == ppo.read_bytes()
    assert main(["configs", "copy", "configs/sft.yaml", "renamed.yaml"]) == 0
    assert (tmp_path / "renamed.yaml").read_bytes() == (CONFIGS / "sft.yaml").read_bytes()
    assert not [p for p in tmp_path.rglob(".*tmp-*")]  # no temporary left

    assert main(["configs", "copy", "smolm2"]) == 2
    assert "Close matches: smollm2" in capsys.readouterr().err

    # A destination under a file: refused by name (a FileExistsError traceback before).
    (tmp_path / "afile").write_text("keep")
    for dest, why in [("afile", "is a file, not a directory"), ("afile/x", "cannot be created")]:
        assert main(["configs", "copy", "sft.yaml", dest]) == 2
        err = capsys.readouterr().err
        assert f"error: the destination folder '{dest}' {why}" in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "keep"


@pytest.mark.parametrize("name", ["experiment.yaml", "smollm2/experiment.yaml"])
def test_a_copied_pipeline_yaml_comes_with_its_stage_yamls_and_its_plan_holds(
    name, tmp_path, monkeypatch, capsys
):
    """A pipeline YAML copied alone named stage YAMLs that were not beside it: `salsa pipeline`
    refused the copy (`config file './sft.yaml' does not exist`). Now its stages' YAMLs come
    with it, the ones of its own folder (smollm2's sft.yaml, not the embedded task's)."""
    import yaml

    from salsa_lightning.pipeline import Stage, check_plan

    monkeypatch.chdir(tmp_path)
    assert main(["configs", "copy", name, "mine"]) == 0
    source = CONFIGS / name
    stages = [Stage(**s) for s in yaml.safe_load(source.read_text())["stages"]]
    named = sorted({c for s in stages for c in s.configs})
    assert len(named) >= 5
    assert capsys.readouterr().out.strip() == (
        f"copied {name} to mine/experiment.yaml ({len(named) + 1} files: the pipeline and the "
        "stage YAMLs it names)"
    )
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == sorted(
        ["experiment.yaml", *named]
    )
    for config in named:
        assert (tmp_path / "mine" / config).read_bytes() == (source.parent / config).read_bytes()
    given = {i for s in stages for i in s.inputs} - {o for s in stages for o in s.outputs}
    for path in given:
        (tmp_path / "run" / path).mkdir(parents=True)
    check_plan(stages, tmp_path / "run", tmp_path / "mine")  # every stage YAML is there
    # An edited stage YAML beside it is not overwritten unasked; nothing is written then.
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "sft.yaml").write_text("edited: true\n")
    assert main(["configs", "copy", name, "again"]) == 2
    assert "again/sft.yaml already exists; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "again").iterdir()] == ["sft.yaml"]


def test_configs_copy_configs_copies_all_of_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["configs", "copy", "configs", "."]) == 0
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.yaml")) == sorted(
        f"configs/{p.relative_to(CONFIGS).as_posix()}" for p in ALL_YAML
    )


def test_cli_and_pipeline_do_not_import_each_other():
    """The commands a stage runs live in commands.py, which imports neither cli.py nor
    pipeline.py; pipeline.py imports commands.py, and cli.py both."""
    import ast

    def imported(name: str) -> set[str]:
        tree = ast.parse((Path(salsa_lightning.__file__).parent / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        return {
            m.removeprefix("salsa_lightning.") for m in found if m.startswith("salsa_lightning")
        }

    assert "cli" not in imported("pipeline")
    assert not {"cli", "pipeline"} & imported("commands")
    assert not {"cli", "pipeline", "commands"} & imported("config_files")


def test_help_and_configs_answer_without_lightning_or_torch(tmp_path):
    """``salsa --help`` and ``salsa configs`` loaded every module of the package (Lightning,
    torch, transformers, datasets: 6 s and 540 MB on the 2-core machine) before printing a line;
    now each command loads what it runs, and the package's classes load on first use."""
    import subprocess
    import sys

    check = (
        "import sys; from salsa_lightning.cli import main; "
        "assert main(['--help']) == 0 and main(['configs', 'list']) == 0; "
        "assert main(['--version']) == 0; "
        "assert main(['configs', 'copy', 'sft.yaml', sys.argv[1]]) == 0; "
        "assert main(['no-such-command']) == 2; "
        "heavy = sorted({'torch', 'lightning', 'transformers', 'datasets'} & set(sys.modules)); "
        "assert not heavy, heavy; "
        "import salsa_lightning; salsa_lightning.SFTModule; assert 'lightning' in sys.modules"
    )
    res = subprocess.run([sys.executable, "-c", check, str(tmp_path / "mine.yaml")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "copied sft.yaml" in res.stdout + res.stderr and (tmp_path / "mine.yaml").is_file()
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchModule'"):
        salsa_lightning.NoSuchModule  # noqa: B018


def test_version_names_the_package_and_what_it_runs_on(capsys):
    """``salsa --version`` prints the one version there is (pyproject reads it from the
    package) and the libraries' versions, for a bug report."""
    import importlib.metadata

    assert main(["--version"]) == 0
    line = capsys.readouterr().out.strip()
    assert importlib.metadata.version("salsa-lightning") == salsa_lightning.__version__
    assert line.startswith(f"salsa-lightning {salsa_lightning.__version__} (torch ")
    assert f"lightning {importlib.metadata.version('lightning')}" in line
