"""FSDP2 sharding of Hugging Face models, holding a sharded model whole for a while (decoding),
and gathering full state dicts."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from salsa_lightning.errors import SalsaError


def decoder_layers(model: nn.Module, layer_class: str | None = None) -> list[nn.Module]:
    """The transformer blocks to shard one by one: modules of class ``layer_class``, or of the
    classes the model names in ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``)."""
    names = {layer_class} if layer_class else set()
    if not names:
        for sub in model.modules():
            names.update(getattr(sub, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise SalsaError(
            f"{type(model).__name__} has no known decoder-layer class to shard; name it in the "
            "YAML, e.g. --model.fsdp_layer_class LlamaDecoderLayer."
        )
    return layers


def shard(
    model: nn.Module,
    mesh: Any,
    layer_class: str | None = None,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer, then the whole model, over the data-parallel
    mesh dimension. Frozen models are sharded the same way (they just never reach an optimizer).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    policy = (
        MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        if param_dtype
        else MixedPrecisionPolicy()
    )
    for layer in decoder_layers(model, layer_class):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full, unsharded state dict of a model sharded by FSDP2 (DTensor parameters) or FSDP1
    (``FullyShardedDataParallel`` units inside it), offloaded to CPU; under FSDP1 only rank 0
    gets the tensors, other ranks an empty dict. A collective: call it on every rank. None for
    a model that is not sharded."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()) and not any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    ):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # FSDP1 offloading tensors that already live on the CPU crashes (gloo runs in tests).
    offload = next(model.parameters()).device.type != "cpu"
    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload)
    )


def fsdp_kind(model: nn.Module) -> Literal["fsdp2", "fsdp1"] | None:
    """Which FSDP shards ``model``: ``fsdp2`` (``fully_shard`` units), ``fsdp1``
    (``FullyShardedDataParallel`` units inside it), or None (not sharded)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    for m in model.modules():
        if isinstance(m, FSDPModule):
            return "fsdp2"
        if isinstance(m, FullyShardedDataParallel):
            return "fsdp1"
    return None


def whole_after_forward(model: nn.Module, module: nn.Module) -> bool:
    """Whether ``module``'s weights are whole, not sharded, right after a forward of ``model``:
    always when nothing shards it; under FSDP2 when ``module`` is in ``model``'s own unit,
    which as its tree's root (:func:`shard`) keeps its weights gathered after forward, for
    backward; never under FSDP1 (Lightning's wrapping makes the output layer a unit of its own,
    resharded after its forward)."""
    from torch.distributed.fsdp import FSDPModule

    kind = fsdp_kind(model)
    if kind != "fsdp2":
        return kind is None
    owners = [m for m in model.modules() if isinstance(m, FSDPModule) and module in m.modules()]
    return owners == [model]


def sharded_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP units of ``model`` that hold parameters (FSDP2 modules; FSDP1 wrappers with a
    flat parameter), outermost first: each is all-gathered as one piece."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return [
        m
        for m in model.modules()
        if isinstance(m, FSDPModule)
        or (isinstance(m, FullyShardedDataParallel) and m._handle is not None)
    ]


def is_resharded(model: nn.Module) -> bool:
    """Whether every unit of ``model`` holds only its shard (no gathered copy allocated)."""
    from torch.distributed.tensor import DTensor

    if fsdp_kind(model) == "fsdp2":  # FSDP2 registers DTensors while sharded, plain tensors else
        return all(isinstance(p, DTensor) for p in model.parameters())
    handles = [m._handle for m in sharded_units(model)]
    return all(not h.uses_sharded_strategy or h.needs_unshard() for h in handles)


@contextmanager
def gathered(model: nn.Module, layers: bool = True) -> Iterator[None]:
    """Hold the FSDP units of ``model`` whole on every rank inside the context, then reshard
    them: the decoding of a rollout (``generation.sample``).

    With ``layers`` (``generation.gather: once``) every unit is all-gathered once and kept
    through every forward inside the context, so decoding N tokens costs one gather per unit
    instead of N and runs no collective per token. The cost: one full copy of the model's
    weights (in the dtype its forward gathers) on every rank while the context lasts. Without
    (``per_layer``), FSDP2 holds only the outermost units (embeddings, final norm, head: what
    FSDP2 keeps after a root's forward anyway) and the decoder layers are gathered by FSDP's
    hooks at every step; FSDP1 holds nothing.

    ``model`` must be a whole FSDP tree (as :func:`shard` and ``FSDP1Strategy`` build it); no
    backward may run inside. On exit every unit holds only its shard (``is_resharded``).

    - FSDP2: the outermost units are lazily initialised as FSDP roots first (a peft model
      generates through its base model, so its root's forward hooks never run in decoding and
      would not make it the root); then ``set_reshard_after_forward(False)`` and ``unshard()``
      on each held unit. On exit each gets its default back (no reshard after forward for a
      root, reshard for the others) and ``reshard()``.
    - FSDP1 (no public per-unit unshard): each held ``FULL_SHARD`` / ``HYBRID_SHARD`` handle
      keeps its gathered flat parameter after forward, as ``SHARD_GRAD_OP`` does, so its
      first forward gathers it and later ones reuse it (mixed precision as in any forward);
      on exit the strategies come back and every gathered handle is freed, as FSDP frees it
      after backward. (``summon_full_params`` gathers in full precision, not the forward's
      dtype, and FSDP refuses forwards inside it.)
    """
    kind = fsdp_kind(model)
    context = {"fsdp2": _gathered_fsdp2, "fsdp1": _gathered_fsdp1}.get(kind)
    if context is None or (kind == "fsdp1" and not layers):
        yield
        return
    with context(sharded_units(model), layers):
        yield


@contextmanager
def _gathered_fsdp2(units: list[nn.Module], layers: bool) -> Iterator[None]:
    roots = [u for u in units if not any(u is not o and _contains(o, u) for o in units)]
    for root in roots:
        root._get_fsdp_state()._lazy_init()  # a no-op once a forward ran through it
    held = units if layers else roots
    for unit in held:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in held:
            unit.set_reshard_after_forward(not any(unit is r for r in roots), recurse=False)
            unit.reshard()


@contextmanager
def _gathered_fsdp1(units: list[nn.Module], layers: bool) -> Iterator[None]:
    from torch.distributed.fsdp._flat_param import HandleShardingStrategy as S
    from torch.distributed.fsdp._runtime_utils import _reshard

    keep = {S.FULL_SHARD: S.SHARD_GRAD_OP, S.HYBRID_SHARD: S._HYBRID_SHARD_ZERO2}
    saved = [(unit, unit._handle._sharding_strategy) for unit in units]
    for unit, strategy in saved:
        unit._handle._sharding_strategy = keep.get(strategy, strategy)
    try:
        yield
    finally:
        for unit, strategy in saved:
            handle = unit._handle
            handle._sharding_strategy = strategy
            if handle.uses_sharded_strategy and not handle.needs_unshard():
                _reshard(unit, handle, free_unsharded_flat_param=True)


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def end_process_group() -> None:
    """Destroy the process group a sharded or multi-process run started, after freeing what the
    run left (its trainer and modules; FSDP's state holds gloo's last collective works): left to
    the interpreter's exit, gloo's threads abort the process now and then, its work done
    ("terminate called without an active exception", exit 134), one run in ten on 2 CPU
    processes. Lightning destroys only an NCCL group, at exit."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
