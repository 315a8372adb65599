"""FSDP2 sharding of Hugging Face models and gathering their full state dicts."""

from __future__ import annotations

from typing import Any

import torch
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
