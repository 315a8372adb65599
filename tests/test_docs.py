"""The README and docs/*.md say only what holds: every command in their code blocks parses (each
``salsa`` line through its own command's parser, from an empty directory, without running it),
``pip`` and ``pytest`` lines name extras, markers and files that exist, every relative link
resolves, and the layout table names every file of the package."""

from __future__ import annotations

import argparse
import re
import shlex
from importlib.util import find_spec
from pathlib import Path

import pytest
import tomllib
import yaml
from conftest import REPO
from packaging.requirements import Requirement

from salsa_lightning.cli import configs_parser, pipeline_parser, quickstart_parser
from salsa_lightning.commands import (
    LIGHTNING_COMMANDS,
    convert_parser,
    function_parser,
    join_list_flags,
    soup_parser,
)
from salsa_lightning.config_files import packaged_path, resolve_config, resolve_config_args
from salsa_lightning.lightning_cli import SalsaCLI

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGE = REPO / "salsa_lightning"

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`(salsa [^`]+)`(?!`)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
USAGE = re.compile(r"[\[|]|\.\.\.|\b[A-Z]{2,}\b")  # `salsa convert --gguf FILE [--overwrite]`
SHELLS = ("bash", "sh", "shell")
OTHER_COMMANDS = {"cat", "tensorboard"}  # shown for the reader, nothing of ours to check


def blocks(path: Path, languages: tuple[str, ...]) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text("utf-8")) if lang in languages]


def commands(path: Path) -> list[list[str]]:
    """Every command of the shell blocks (continuation lines joined, comments dropped, ``&&``
    chains split, ``VAR=value`` prefixes dropped), and every inline ``salsa ...`` span that is a
    command line rather than a command's name or usage."""
    out = []
    for body in blocks(path, SHELLS):
        for line in body.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens:
                cut = tokens.index("&&") if "&&" in tokens else len(tokens)
                out.append(tokens[:cut])
                tokens = tokens[cut + 1 :]
    for span in INLINE.findall(path.read_text("utf-8")):
        if not USAGE.search(span) and re.search(r"--|[./]", span):  # not a name: `salsa soup`
            out.append(shlex.split(span))
    stripped = []
    for tokens in out:
        if tokens and re.fullmatch(r"[A-Za-z_]+=\$\(.*", tokens[0]):
            continue  # VAR=$(...): an assignment for the lines below
        while tokens and re.fullmatch(r"[A-Za-z_]+=.*", tokens[0]):
            tokens = tokens[1:]  # OMP_NUM_THREADS=1 pytest ...
        if tokens:
            stripped.append(tokens)
    return stripped


ALL = [(page, cmd) for page in PAGES for cmd in commands(page)]


def ids(case) -> str:
    page, cmd = case
    return f"{page.relative_to(REPO)}: {' '.join(cmd)[:70]}"


# ----------------------------------------------------------------------------- salsa lines


def parse_salsa(argv: list[str]) -> None:
    """Parse one ``salsa`` command line with its command's own parser; run nothing."""
    command, *rest = resolve_config_args(argv)
    if command in LIGHTNING_COMMANDS:
        with pytest.raises(SystemExit) as done:  # --print_config: parse, print, exit 0
            SalsaCLI(args=[command, *rest, "--print_config"])
        assert done.value.code in (0, None), done.value.code
    elif command in ("evaluate", "landscape", "pairs"):
        where, name = {"pairs": ("reward", "sampled_pairs")}.get(command, (command, command))
        fn = getattr(__import__(f"salsa_lightning.{where}", fromlist=[name]), name)
        function_parser(fn, f"salsa {command}").parse_args(join_list_flags(fn, rest))
    elif command == "soup":
        soup_parser().parse_args(rest)
    elif command == "convert":
        convert_parser().parse_args(rest)
    elif command == "pipeline":
        assert resolve_config(pipeline_parser().parse_args(rest).config).is_file()
    elif command == "quickstart":
        assert resolve_config(quickstart_parser().parse_args(rest).config).is_file()
    elif command == "configs":
        args = configs_parser().parse_args(rest)
        if args.action == "copy":
            assert packaged_path(args.name) is not None, args.name
    else:
        raise AssertionError(f"unknown salsa command {command!r}")


# ----------------------------------------------------------------------------- pip and pytest lines


def check_pip(args: list[str]) -> None:
    assert args[0] == "install", args
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    for arg in args[1:]:
        if arg.startswith("-"):
            assert arg in ("-e", "-q", "--no-deps", "-U"), arg
            continue
        project = re.fullmatch(r"(\.|salsa-lightning)(\[([\w,-]+)\])?", arg)
        if project:
            named = set(project.group(3).split(",")) if project.group(3) else set()
            assert named <= extras, f"{arg}: no extra {named - extras} in pyproject.toml"
        else:
            Requirement(arg)  # a requirement pip understands


def check_pytest(args: list[str]) -> None:
    markers = {m.split(":")[0] for m in PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-m":
            words = set(re.findall(r"\w+", args[i + 1])) - {"and", "or", "not"}
            assert words <= markers, f"unknown marker {words - markers}"
            i += 2
        elif arg in ("-k", "-n"):
            i += 2
        elif arg.startswith("-"):
            assert arg in ("-x", "-s", "-q", "-v") or arg.startswith("--durations"), arg
            i += 1
        else:
            assert (REPO / arg.split("::")[0]).exists(), arg
            i += 1


@pytest.mark.parametrize("case", ALL, ids=[ids(c) for c in ALL])
def test_documented_command_parses(case, tmp_path, monkeypatch, capsys):
    """From an empty directory, as a user of the installed package: ``--config configs/...``
    resolves to the packaged YAML."""
    page, (program, *args) = case
    monkeypatch.chdir(tmp_path)
    if program == "srun":  # SLURM starts the salsa command on every task
        program, *args = args
    if program == "torchrun":  # torchrun's own options, then -m salsa_lightning.cli ARGS
        program, args = "salsa", args[args.index("salsa_lightning.cli") + 1 :]
    if program == "salsa":
        try:
            parse_salsa(args)
        except SystemExit as done:  # --help: printed, exit 0
            assert done.code in (0, None) and "--help" in args, done.code
    elif program == "pip":
        check_pip(args)
    elif program == "pytest":
        check_pytest(args)
    elif program == "python":
        if args[0] == "-m":
            assert find_spec(args[1]) is not None, args[1]
        elif args[0] != "-c":
            assert (REPO / args[0]).is_file(), args[0]
    elif program == "bash":
        assert (REPO / args[0]).is_file(), args[0]
    else:
        assert program in OTHER_COMMANDS, (
            f"{page.name}: a command this test does not know: {program}"
        )


def test_the_readme_shows_both_commands_and_every_stage():
    found = [cmd for page, cmd in ALL if page == README]
    assert ["pytest", "-n", "2"] in found  # the default suite on two workers
    assert ["salsa", "quickstart"] in found
    salsa = {cmd[1] for cmd in found if cmd[0] == "salsa"}
    assert {"fit", "soup", "evaluate", "landscape", "quickstart", "pipeline"} <= salsa


def test_a_wrong_flag_fails_the_check(tmp_path, monkeypatch, capsys):
    """The check above can fail: a misspelled flag or command does not parse."""
    monkeypatch.chdir(tmp_path)
    for argv in (
        ["fit", "--config", "configs/sft.yaml", "--trainer.max_epochz", "3"],
        ["soup", "--config", "configs/soup.yaml", "--weighs", "1"],
        ["landscape", "--checkpointz", "a", "b", "--prompts", "p"],
        ["quickstart", "--outputz", "x"],
        ["configs", "copy", "no-such.yaml"],
    ):
        with pytest.raises((SystemExit, argparse.ArgumentError, AssertionError)) as failed:
            parse_salsa(argv)
        assert not isinstance(failed.value, SystemExit) or failed.value.code != 0, argv


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_snippets_are_yaml(page):
    for body in blocks(page, ("yaml",)):
        assert isinstance(yaml.safe_load(body), dict)


# ----------------------------------------------------------------------------- links and pages


def slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    for target in LINK.findall(page.read_text("utf-8")):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to {target} does not resolve"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", file.read_text("utf-8"), re.M)
            assert anchor in {slug(h) for h in headings}, f"{page.name}: no heading #{anchor}"


def test_the_readme_is_short_and_links_every_docs_page():
    text = README.read_text("utf-8")
    assert len(text.encode()) <= 12 * 1024
    linked = {Path(t).name for t in LINK.findall(text) if t.startswith("docs/")}
    assert {p.name for p in DOCS} <= linked, "docs pages the README does not link"


def test_the_layout_table_names_every_file_of_the_package():
    """docs/layout.md, the one home of the layout table: every module and subpackage of
    salsa_lightning is in it, and every ``.py`` it names exists."""
    text = (REPO / "docs/layout.md").read_text("utf-8")
    named = set(re.findall(r"`([\w/]+\.py|[\w]+/)`", text))
    files = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    folders = {f"{p.parent.name}/" for p in PACKAGE.glob("*/__init__.py")}
    inner = {p.name for p in PACKAGE.glob("*/*.py") if p.name != "__init__.py"}
    assert files | folders <= named, f"not in docs/layout.md: {sorted((files | folders) - named)}"
    assert inner <= named, f"not in docs/layout.md: {sorted(inner - named)}"
    stale = {n for n in named if n.endswith(".py")} - files - inner
    assert not stale, f"docs/layout.md names files that do not exist: {sorted(stale)}"
    for page in PAGES:
        if page.name != "layout.md":
            assert "| file or package |" not in page.read_text("utf-8"), page.name
