"""``model.compile``: the forwards over whole sequences (scoring and the update) compiled.

Each model's transformer stack (embeddings, blocks, final norm: the decoder the heads read)
is compiled in place (``nn.Module.compile``: the state dict's names stay the same) with
dynamic shapes, so one graph serves every batch and response length (a rollout that stops
at EOS changes the length from one iteration to the next; marked static, each new length
would compile again). Its heads stay eager: the tiled log-probs read the hidden states.

A trained model whose head is tied to its input embedding compiles its blocks one by one
instead: the embedding's lookup goes through :func:`~salsa_lightning.generation.tied_gradient`,
whose forward hook is made for each pass.

Decoding has its own compiled form (``generation.compile``, :class:`StaticDecoder`); the
other decoding paths call a compiled model eagerly (:func:`eager_unless_compiled`), since a
forward with a KV cache is another graph for each of its states.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn

from salsa_lightning.errors import SalsaError
from salsa_lightning.lora import unwrap_peft

# Graphs Dynamo keeps for one function before it runs the rest eagerly (torch's default: 8).
RECOMPILES = 64


def allow_recompiles() -> None:
    """Let Dynamo keep ``RECOMPILES`` graphs of one function: past torch's default of 8 it runs
    the function eagerly from then on, with a warning."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILES)


def transformer_stack(model: nn.Module) -> nn.Module | None:
    """The decoder a transformers model (peft-wrapped too) keeps under its
    ``base_model_prefix`` (``model.model``, ``transformer``), or None."""
    base = unwrap_peft(model)
    inner = getattr(base, getattr(base, "base_model_prefix", ""), None)
    return inner if isinstance(inner, nn.Module) and inner is not base else None


def models_within(module: nn.Module) -> Iterator[nn.Module]:
    """The outermost transformers models inside ``module`` (a critic's classifier, a reward
    ensemble's members)."""
    for child in module.children():
        if transformer_stack(child) is not None:
            yield child
        else:
            yield from models_within(child)


def compile_forwards(model: nn.Module) -> list[nn.Module]:
    """Compile ``model``'s transformer stack in place (its blocks one by one where a trained
    head is tied to the input embedding), or those of the models it holds (a critic, a reward
    ensemble); returns the modules compiled."""
    from salsa_lightning.generation import output_layer, tied_embedding  # imports this module
    from salsa_lightning.sharding import decoder_layers

    stack = transformer_stack(model)
    if stack is None:
        inner = list(models_within(model))
        if not inner:
            raise ValueError(f"{type(model).__name__} has no transformer stack to compile")
        return [compiled for part in inner for compiled in compile_forwards(part)]
    # Every stack of a model family runs one function (its forward's decorator), whose graphs
    # Dynamo counts together: frozen and trained, each model size, SFT then reward then RL in
    # one notebook.
    allow_recompiles()
    layer = output_layer(model)
    tied = layer is not None and tied_embedding(model, layer[1]) is not None
    modules = decoder_layers(model) if tied else [stack]
    for module in modules:
        module.compile(dynamic=True)
    return modules


def is_compiled(model: nn.Module) -> bool:
    """Whether any module of ``model`` was compiled in place."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def eager_unless_compiled(model: nn.Module, compiled_here: bool) -> AbstractContextManager:
    """A context in which ``model``'s compiled modules run eagerly, unless the caller's own
    code is compiled (``compiled_here``: Dynamo then traces them into its graph)."""
    if compiled_here or not is_compiled(model):
        return nullcontext()
    return torch.compiler.set_stance("force_eager")


def check_compile(strategy: Any) -> None:
    """``model.compile`` runs on one device (the sharded strategies wrap each block in hooks
    that gather its weights, which this compile does not trace), and on the CPU needs the C++
    compiler Inductor builds its kernels with (else the first forward would fail, models
    built and a rollout sampled)."""
    if not isinstance(strategy, SingleDeviceStrategy):
        raise SalsaError(
            f"model.compile: compiles the models on one device; this run's strategy is "
            f"{type(strategy).__name__}. Remove model.compile, or run on one device "
            "(trainer.devices: 1)."
        )
    if strategy.root_device.type == "cpu" and not has_cpp_compiler():
        raise SalsaError(
            "model.compile on the CPU: torch.compile's Inductor builds C++ kernels and finds "
            "no C++ compiler (it looks for $CXX, else g++). Install one (e.g. apt install g++) "
            "or remove model.compile."
        )


def has_cpp_compiler() -> bool:
    """Whether Inductor finds a C++ compiler (its own search; True where this torch build
    searches otherwise)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler
    except ImportError:
        return True
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        return False
    return True
