"""The one exception type the project raises for bad input, and the checks of settings that
raise it."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any, Literal


class SalsaError(ValueError):
    """A user-fixable problem with an input: a file, a column, a tensor or a setting.

    The message names the culprit and says what to do. The ``salsa`` command prints it
    without a traceback and exits with status 2; ``details`` (for example the traceback of the
    user's own code that failed) is printed before it.
    """

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


def literal_choices(annotation: Any) -> tuple[Any, ...]:
    """The values a ``Literal[...]`` annotation (or ``Literal[...] | None``) admits; () if none."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(v for arg in typing.get_args(annotation) for v in literal_choices(arg))
    return ()


def check_choices(section: str, annotated: Any, values: Any) -> None:
    """Refuse a value outside the ``Literal[...]`` choices of its annotation.

    The command line's parser refuses such a value already (and its help lists the choices);
    this gives Python callers the same refusal.

    Args:
        section: Prefixes each setting's name in the message (``model.kl``, ``data``).
        annotated: What annotates the settings: a dataclass, or a function or ``__init__``.
        values: The settings by name (a dataclass instance, or a mapping such as ``hparams``).
    """
    values = values if isinstance(values, Mapping) else vars(values)
    for name, hint in typing.get_type_hints(annotated).items():
        choices, value = literal_choices(hint), values.get(name)
        optional = type(None) in typing.get_args(hint)
        if choices and value not in choices and not (optional and value is None):
            raise SalsaError(
                f"{section}.{name} is {value!r}; choose one of "
                f"{', '.join(str(c) for c in choices)}" + (" (or null)." if optional else ".")
            )


def require(ok: bool, setting: str, rule: str, value: Any) -> None:
    """Refuse ``value`` of ``setting`` unless ``ok``: "``setting`` must be ``rule``, got ..."."""
    if not ok:
        raise SalsaError(f"{setting} must be {rule}, got {value}.")
