"""A moving KL reference (``SALSAModule(reference_update={every, alpha})``): which tensors move
toward which, and the move (``functional.ema_``).

- A full policy: each reference model (the soup; under ``multiple_kl`` every checkpoint) moves
  toward the policy's parameters, name by name.
- A LoRA policy whose reference is its disabled adapter (LoRA on the soup): the reference
  becomes a second adapter, ``reference``, on the same base model, started as a copy of the
  policy's adapter (whose B factors are 0, so it is the base exactly), and each update moves its
  factors toward the policy's. No second copy of the model is made. What that means: an EMA of
  the factors is not the EMA of the merged models. After one update the reference's delta is
  ``((1 - a) B_r + a B_p) ((1 - a) A_r + a A_p) = (1 - a)^2 B_r A_r + a^2 B_p A_p + a (1 - a)
  (B_r A_p + B_p A_r)`` where the EMA of the deltas is ``(1 - a) B_r A_r + a B_p A_p``: the
  cross terms replace part of both (see ``soup/merge.py`` for the same fact about LoRA soups).
  ``alpha`` 1 (a hard sync) is exact. An exact EMA would need a rank that grows by r at every
  update (rank concatenation); the factor EMA keeps the rank and the memory fixed, which is the
  point of LoRA, and is what is done here.
- A LoRA policy with full reference models (``multiple_kl``, or a policy that starts from a
  checkpoint): each reference moves toward the policy's merged weights ``W + s B A``, computed
  at each update on one device (under FSDP2 the product needs whole factors: refused in setup).
- Sharded (FSDP2): the policy and its references are sharded alike (``sharding.shard``: one
  layout per parameter shape), so each rank moves its local shard of the reference toward its
  local shard of the policy: no gather, no communication. FSDP2 keeps a root module's own
  parameters gathered after a forward that no backward follows (a frozen model's), so both are
  first put back into their shards (``resharded``: local, it frees the gathered copies).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from salsa_lightning.errors import SalsaError
from salsa_lightning.frozen import mark_moving
from salsa_lightning.functional import ema_

POLICY_ADAPTER = "default"  # peft's name for the adapter get_peft_model adds
REFERENCE_ADAPTER = "reference"


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def add_reference_adapter(policy: nn.Module) -> None:
    """Give a LoRA policy a second adapter, ``reference``: a frozen copy of its own adapter
    (so, at first, the same model as the disabled adapter: B is 0), kept in checkpoints."""
    # Its random init is overwritten by the copy below: it must not advance the RNG that
    # sampling draws from (or alpha 0 would not be the frozen reference to the last digit).
    devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices):
        policy.add_adapter(REFERENCE_ADAPTER, copy.deepcopy(policy.peft_config[POLICY_ADAPTER]))
    params = dict(policy.named_parameters())
    modules = dict(policy.named_modules())
    with torch.no_grad():
        for name, target in adapter_pairs(policy):
            target.copy_(params[name.replace(f".{REFERENCE_ADAPTER}.", f".{POLICY_ADAPTER}.")])
            target.requires_grad_(False)
            owner = name.rsplit(".", 1)[0]
            if not owner.endswith(f".{REFERENCE_ADAPTER}"):
                raise SalsaError(
                    f"LoRA parameter {name} is not held in a module of its own (embedding "
                    "LoRA?); a moving reference supports LoRA on linear layers only: set "
                    "model.lora.target_modules to linear layers."
                )
            mark_moving(modules[owner])


def adapter_pairs(policy: nn.Module) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` of the reference adapter's factors, in the model's order."""
    return [(n, p) for n, p in policy.named_parameters() if f".{REFERENCE_ADAPTER}." in n]


@contextmanager
def reference_adapter(policy: nn.Module) -> Iterator[None]:
    """Run the LoRA policy with its ``reference`` adapter instead of its own; every parameter's
    ``requires_grad`` is as it was afterwards (peft's ``set_adapter`` changes them)."""
    grads = [(p, p.requires_grad) for p in policy.parameters()]
    policy.set_adapter(REFERENCE_ADAPTER)
    try:
        yield
    finally:
        policy.set_adapter(POLICY_ADAPTER)
        for p, wanted in grads:
            p.requires_grad_(wanted)


def policy_weights(policy: nn.Module) -> dict[str, Tensor]:
    """The policy's weights under the plain model's parameter names: its parameters, or, for a
    LoRA policy, its merged weights ``W + s B A`` (new tensors) and its other base weights."""
    if not is_peft(policy):
        return dict(resharded(policy).named_parameters())
    from peft.tuners.lora import LoraLayer

    base = policy.get_base_model()
    out: dict[str, Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and POLICY_ADAPTER in module.lora_A:
            weight = module.get_base_layer().weight
            out[f"{name}.weight"] = weight + module.get_delta_weight(POLICY_ADAPTER).to(weight)
    for name, param in base.named_parameters():
        if ".lora_" not in name:
            out.setdefault(name.replace(".base_layer.", "."), param)
    return out


def resharded(model: nn.Module) -> nn.Module:
    """``model`` with every FSDP2 unit of it in its sharded state (no communication: the
    gathered copies are freed); a model that is not sharded as it is."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard (the tensor itself, no copy, under no_grad); a plain tensor."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def check_same_layout(name: str, target: Tensor, source: Tensor) -> None:
    """Both unsharded, or both DTensors sharded the same way over the same mesh."""
    from torch.distributed.tensor import DTensor

    a, b = isinstance(target, DTensor), isinstance(source, DTensor)
    if a != b or (
        a and (target.placements, target.device_mesh) != (source.placements, source.device_mesh)
    ):
        raise SalsaError(
            f"moving reference: {name} is sharded differently in the reference and the policy; "
            "shard both with the same strategy (configs/fsdp.yaml) and fsdp_layer_class."
        )


@torch.no_grad()
def move_toward(reference: nn.Module, sources: Mapping[str, Tensor], alpha: float) -> None:
    """``reference <- (1 - alpha) reference + alpha sources``, parameter by parameter (local
    shards under FSDP2).

    Raises:
        SalsaError: The reference has a parameter the policy lacks, or the other way round.
    """
    targets = dict(resharded(reference).named_parameters())
    if targets.keys() != sources.keys():
        name = sorted(set(targets) ^ set(sources))[0]
        where = "the policy" if name in targets else "the reference"
        raise SalsaError(
            f"moving reference: {where} has no parameter {name}; the reference can only move "
            "toward a policy of the same architecture."
        )
    for name in targets:
        check_same_layout(name, targets[name], sources[name])
    ema_([local(targets[n]) for n in targets], [local(sources[n]) for n in targets], alpha)


@torch.no_grad()
def move_adapter(policy: nn.Module, alpha: float) -> None:
    """The ``reference`` adapter's factors ``<- (1 - alpha) reference + alpha policy``."""
    params = dict(resharded(policy).named_parameters())
    pairs = adapter_pairs(policy)
    sources = [params[n.replace(f".{REFERENCE_ADAPTER}.", f".{POLICY_ADAPTER}.")] for n, _ in pairs]
    for (name, target), source in zip(pairs, sources, strict=True):
        check_same_layout(name, target, source)
    ema_([local(t) for _, t in pairs], [local(s) for s in sources], alpha)
