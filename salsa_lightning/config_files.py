"""The packaged YAML configs: where they are, how a ``--config`` name finds one, and what
``salsa configs list`` and ``salsa configs copy`` show and write.

The YAMLs live once, in the repository's top-level ``configs/``. A wheel carries the same files
as ``salsa_lightning/configs/`` (``pyproject.toml`` maps one folder onto the other), so an
installed package finds them beside its modules and a source checkout (an editable install, or
``PYTHONPATH``) finds them in the checkout.

A ``--config`` value names a file here first; when there is none, the packaged YAML of that name,
with a leading ``configs/`` dropped (``configs/fsdp.yaml`` is the packaged ``fsdp.yaml``).
Pipelines name their stage YAMLs relative to the pipeline YAML, so a packaged pipeline runs the
packaged stages.
"""

from __future__ import annotations

import difflib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from salsa_lightning.errors import SalsaError
from salsa_lightning.outputs import check_writable_dir, file_written_aside, written_aside

INSTALLED = Path(__file__).parent / "configs"  # in a wheel
CHECKOUT = Path(__file__).resolve().parents[1] / "configs"  # in a source checkout
SUFFIXES = (".yaml", ".yml")


def packaged_dir() -> Path:
    """The folder that holds the packaged YAMLs."""
    for folder in (INSTALLED, CHECKOUT):
        if folder.is_dir():
            return folder
    raise SalsaError(
        f"no packaged configs: neither {str(INSTALLED)!r} nor {str(CHECKOUT)!r} exists; "
        "reinstall salsa-lightning."
    )


def packaged_names() -> list[str]:
    """Every packaged YAML, as a path relative to the configs folder (``smollm2/sft.yaml``)."""
    root = packaged_dir()
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix in SUFFIXES and p.is_file()
    )


def first_comment(path: Path) -> str:
    """The text of a YAML's first comment line (what the file is), or ``""``."""
    for line in path.read_text("utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def relative_name(name: str | os.PathLike) -> PurePosixPath:
    """``name`` inside the configs folder: ``configs/fsdp.yaml`` is ``fsdp.yaml``, and
    ``configs`` the folder itself (``.``)."""
    rel = PurePosixPath(Path(name).as_posix())
    return PurePosixPath(*rel.parts[1:]) if rel.parts[:1] == ("configs",) else rel


def packaged_path(name: str | os.PathLike) -> Path | None:
    """The packaged file or folder ``name`` names (:func:`relative_name`), or None."""
    rel = relative_name(name)
    if rel.is_absolute() or ".." in rel.parts:
        return None
    path = packaged_dir() / rel
    return path if path.exists() else None


def close_matches(name: str | os.PathLike) -> list[str]:
    """Packaged YAMLs and folders whose names are close to ``name`` (at most 5)."""
    names = packaged_names()
    folders = sorted({str(PurePosixPath(n).parent) for n in names} - {"."})
    query = relative_name(name)
    same_file = [n for n in names if PurePosixPath(n).name == query.name]
    similar = difflib.get_close_matches(str(query), names + folders, n=5, cutoff=0.6)
    return list(dict.fromkeys(same_file + similar))[:5]


def unknown(name: str | os.PathLike, what: str) -> SalsaError:
    """The error for a name that is neither a file here nor a packaged config."""
    close = close_matches(name)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return SalsaError(
        f"{what} {str(name)!r} is neither a file here nor a packaged config.{hint} "
        "`salsa configs list` lists the packaged ones."
    )


def find_config(name: str | os.PathLike) -> Path:
    """The YAML a ``--config`` value names: the file ``name`` when it exists, else the packaged
    one (``sft.yaml``, ``configs/fsdp.yaml``, ``smollm2/pipeline.yaml``).

    Raises:
        SalsaError: Neither exists; the message lists close packaged names.
    """
    path = Path(name)
    if path.is_file():
        return path
    packaged = packaged_path(name)
    if packaged is None or not packaged.is_file():
        raise unknown(name, "config")
    return packaged


def resolve_config(value: str | os.PathLike, log: Callable[[str], None] | None = None) -> Path:
    """:func:`find_config`, telling ``log`` in one line when a packaged YAML stands in."""
    found = find_config(value)
    if log is not None and found != Path(value):
        log(f"--config {value}: using the packaged {found}")
    return found


def config_flags(argv: list[str]) -> Iterator[tuple[int, str, str]]:
    """``(index, value, prefix)`` of every ``--config VALUE`` (prefix ``""``) or
    ``--config=VALUE`` (prefix ``"--config="``) in ``argv``."""
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            yield i + 1, argv[i + 1], ""
        elif token.startswith("--config="):
            yield i, token.partition("=")[2], "--config="


def resolve_config_args(argv: list[str], log: Callable[[str], None] | None = None) -> list[str]:
    """``argv`` with every ``--config NAME.yaml`` that is not a file here replaced by the
    packaged YAML's path (:func:`resolve_config`). Values that do not end in ``.yaml`` or
    ``.yml`` (inline YAML) are left to the parser."""
    out = list(argv)
    for at, value, prefix in config_flags(argv):
        if value.endswith(SUFFIXES):
            out[at] = prefix + str(resolve_config(value, log))
    return out


def check_not_a_pipeline(command: str, argv: list[str]) -> None:
    """Refuse a pipeline YAML (one that lists ``stages``) given to a stage command: the parser
    would name only its first key the command does not take (``report.methods...``)."""
    for _, value, _ in config_flags(argv):
        path = Path(value)
        if path.suffix in SUFFIXES and path.is_file() and "stages" in read_mapping(path):
            raise SalsaError(
                f"{value} is a pipeline YAML (it lists stages), not a config of salsa {command}: "
                f"run it with `salsa pipeline --config {value}`."
            )


def read_mapping(path: Path) -> dict:
    """The top-level mapping of a YAML file (empty when it holds anything else)."""
    import yaml

    spec = yaml.safe_load(path.read_text())
    return spec if isinstance(spec, dict) else {}


def stage_configs(pipeline: Path, dest: Path) -> dict[Path, Path]:
    """The stage YAMLs a pipeline YAML names (paths relative to it; none for another YAML),
    each mapped to the same relative place under ``dest``."""
    stages = read_mapping(pipeline).get("stages")
    stages = [s for s in stages if isinstance(s, dict)] if isinstance(stages, list) else []
    names = dict.fromkeys(str(c) for s in stages for c in s.get("configs") or [])
    return {pipeline.parent / n: dest / n for n in names if (pipeline.parent / n).is_file()}


def copy_config(
    name: str, dest: str | os.PathLike = ".", overwrite: bool = False
) -> tuple[Path, list[Path]]:
    """Copy the packaged YAML or folder ``name`` for editing. A pipeline YAML comes with the
    stage YAMLs it names, beside it as in the package, so that the copy runs (its stages'
    configs are found relative to it).

    Args:
        name: A packaged YAML (``sft.yaml``, ``smollm2/sft.yaml``) or folder (``smollm2``,
            ``paper``; ``configs`` is all of them).
        dest: A folder to copy into (made if missing); for one YAML, a path ending in ``.yaml``
            names the copy itself.
        overwrite: Replace files that exist; without it nothing is written when one does.

    Returns:
        The copy (file or folder) and the files written.
    """
    source = packaged_path(name)
    if source is None:
        raise unknown(name, "config")
    dest = Path(dest)
    if source.is_file():
        target = dest if dest.suffix in SUFFIXES and not dest.is_dir() else dest / source.name
        files = {source: target, **stage_configs(source, target.parent)}
    else:
        target = dest / source.name
        files = {p: target / p.relative_to(source) for p in sorted(source.rglob("*"))}
        files = {s: t for s, t in files.items() if s.suffix in SUFFIXES and s.is_file()}
    check_writable_dir(target.parent, "the destination folder")
    if target.exists() and target.is_dir() != source.is_dir():
        kind = "a folder" if target.is_dir() else "a file"
        raise SalsaError(f"{str(target)!r} is {kind}; choose another destination.")
    existing = [str(t) for t in files.values() if t.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise SalsaError(
            f"{', '.join(existing[:3])}{more} already exist{'s' * (len(existing) == 1)}; "
            "pass --overwrite to replace, or choose another destination."
        )
    if source.is_dir() and not target.exists():
        with written_aside(target) as tmp:  # a new folder appears whole or not at all
            for src, dst in files.items():
                (tmp / dst.relative_to(target)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, tmp / dst.relative_to(target))
        return target, list(files.values())
    for src, dst in files.items():  # each file whole
        with file_written_aside(dst) as tmp:
            shutil.copyfile(src, tmp)
    return target, list(files.values())
