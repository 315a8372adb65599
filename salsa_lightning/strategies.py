"""The FSDP strategies every stage runs under: ``FSDP2Strategy`` (``configs/fsdp.yaml``) and
``FSDP1Strategy`` (``configs/fsdp1.yaml``).

``FSDP2Strategy`` is Lightning's ``ModelParallelStrategy`` whose data-parallel size defaults to
every process (Lightning's ``"auto"`` means the number of nodes, one device per node), so
``--trainer.devices N`` shards over N devices; the modules ``fully_shard`` themselves in
``configure_model``.

FSDP1 is Lightning's ``FSDPStrategy`` with FSDP units read off the LightningModule, so
``configs/fsdp1.yaml`` stacks on any stage YAML.

The units (each one flat parameter of one dtype, gathered while it is called), innermost first:

- every decoder layer of every Hugging Face model of the stage (``models.decoder_layers``,
  honouring the module's ``fsdp_layer_class``; an unknown class fails with a ``SalsaError``);
- every top-level model that is only called through its ``forward`` (the frozen soup reference
  and reward model, the critic, a value head, the reward stage's model), so that a frozen bf16
  model never shares a flat parameter with fp32 trainable weights;
- the children of a trained model that generates (the policy, the SFT model): its backbone and
  its head. ``generate`` calls the model's own ``forward``, which no FSDP wrapper encloses, but
  that forward calls the backbone and head through their wrappers. A head tied to the
  embeddings has no parameter of its own: the backbone's unit then stays gathered from forward
  to backward (``SHARD_GRAD_OP``) so the head can read the embeddings after the backbone
  returned.

The root (the LightningModule) holds no parameter. SALSA-PPO steps its optimizer inside
``training_step``, i.e. inside the root's forward; ``backward`` hooks each such loss the way FSDP
hooks a root output, so each backward ends with FSDP's final callback.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.precision.fsdp import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from salsa_lightning.errors import SalsaError
from salsa_lightning.lora import unwrap_peft
from salsa_lightning.sharding import decoder_layers


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process: ``ModelParallelStrategy`` with ``tensor_parallel_size`` 1 and
    ``data_parallel_size`` the world size (``devices x num_nodes``) unless given.

    Takes every argument of Lightning's ``ModelParallelStrategy``.
    """

    def __init__(
        self, data_parallel_size: int | str = "auto", tensor_parallel_size: int = 1, **kwargs: Any
    ) -> None:
        super().__init__(data_parallel_size, tensor_parallel_size, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            world, tensor = self.num_nodes * self.num_processes, self._tensor_parallel_size
            if not isinstance(tensor, int) or tensor < 1 or world % tensor:
                raise SalsaError(
                    f"FSDP2Strategy: tensor_parallel_size {tensor!r} must be a whole divisor of "
                    f"the world size ({world} = devices x nodes)."
                )
            self._data_parallel_size = world // tensor
        super().setup_environment()


def top_level_models(module: nn.Module) -> list[nn.Module]:
    """The models a LightningModule holds: its children and the items of its ``ModuleList`` /
    ``ModuleDict`` children that hold parameters."""
    out = []
    for child in module.children():
        items = child.children() if isinstance(child, nn.ModuleList | nn.ModuleDict) else [child]
        for item in items:
            if any(True for _ in item.parameters()):
                out.append(item)
    return out


def is_transformer(model: nn.Module) -> bool:
    """Whether ``model`` holds a Hugging Face model (which names its decoder-layer class)."""
    return any(hasattr(m, "_no_split_modules") for m in model.modules())


def fsdp_units(
    module: nn.Module, layer_class: str | None = None
) -> list[tuple[nn.Module, dict[str, Any]]]:
    """The submodules of ``module`` to wrap as FSDP units, innermost first, each with the
    FSDP arguments it overrides (see the module docstring)."""
    from torch.distributed.fsdp import ShardingStrategy

    layers: dict[int, nn.Module] = {}
    models = top_level_models(module)
    for model in models:
        if is_transformer(model):
            layers.update((id(m), m) for m in decoder_layers(model, layer_class))
    units: list[tuple[nn.Module, dict[str, Any]]] = [(m, {}) for m in layers.values()]
    for model in models:
        trained = any(p.requires_grad for p in model.parameters())
        if not (is_transformer(model) and hasattr(model, "generate") and trained):
            units.append((model, {}))
            continue
        # ``generate`` calls the model's own forward: wrap its children instead (the backbone
        # with the embeddings, the head), which that forward calls through their wrappers.
        inner = unwrap_peft(model)
        children = [c for c in inner.children() if any(True for _ in c.parameters())]
        head = inner.get_output_embeddings()
        tied = head is not None and any(
            p is head.weight for c in children if c is not head for p in c.parameters()
        )
        for child in children:
            if tied and child is head:
                continue  # its weight is the embeddings', in the backbone's unit
            # A tied head reads the backbone's embeddings after the backbone's forward
            # returned: keep that unit gathered from its forward to its backward.
            override = {"sharding_strategy": ShardingStrategy.SHARD_GRAD_OP} if tied else {}
            units.append((child, override))
    return units


def wrap_units(module: nn.Module, units: list[tuple[nn.Module, dict[str, Any]]], wrap: Any) -> None:
    """Replace each of ``units`` (innermost first) by ``wrap(unit)`` wherever ``module``'s tree
    holds it; a model reachable under two names (the critic's backbone) is wrapped once."""
    for unit, override in units:
        slots = [
            (parent, name)
            for parent in module.modules()
            for name, child in parent._modules.items()
            if child is unit
        ]
        wrapped = wrap(unit, **override)
        for parent, name in slots:
            parent._modules[name] = wrapped


class RootClippingFSDPPrecision(FSDPPrecision):
    """``FSDPPrecision`` that clips gradients by their global norm through the root FSDP module
    (Lightning's refuses ``gradient_clip_algorithm='norm'``; SALSA-PPO clips by norm)."""

    root: Any = None

    def clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
        self.root.clip_grad_norm_(clip_val)


class FSDP1Strategy(FSDPStrategy):
    """``FSDPStrategy`` (FSDP1) whose units come from the LightningModule, which runs on CPU too
    (``device_id=cpu``, gloo; for tests) and clips gradients by norm.

    Takes every argument of Lightning's ``FSDPStrategy``. Without an ``auto_wrap_policy`` the
    units are those of ``fsdp_units`` (see the module docstring).
    ``use_orig_params`` defaults to True, so optimizers see the modules' own parameters and
    frozen ones never reach them.
    """

    def __init__(self, *, use_orig_params: bool = True, **kwargs: Any) -> None:
        super().__init__(use_orig_params=use_orig_params, **kwargs)

    @property
    def precision_plugin(self) -> FSDPPrecision:
        return FSDPStrategy.precision_plugin.fget(self)

    @precision_plugin.setter
    def precision_plugin(self, plugin: Any) -> None:
        if plugin is not None and type(plugin) is FSDPPrecision:
            plugin = RootClippingFSDPPrecision(plugin.precision, plugin.scaler)
        FSDPStrategy.precision_plugin.fset(self, plugin)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from lightning.fabric.strategies.fsdp import _move_torchmetrics_to_device
        from torch.distributed.fsdp import FullyShardedDataParallel

        device = self.root_device
        defaults = {
            "cpu_offload": self.cpu_offload,
            "mixed_precision": self.mixed_precision_config,
            "sharding_strategy": self.sharding_strategy,
            "device_id": device if device.type == "cpu" else device.index,
            **self.kwargs,
        }

        def wrap(module: nn.Module, **override: Any) -> FullyShardedDataParallel:
            return FullyShardedDataParallel(module, **{**defaults, **override})

        if "auto_wrap_policy" not in self.kwargs:
            layer_class = getattr(model, "hparams", {}).get("fsdp_layer_class")
            wrap_units(model, fsdp_units(model, layer_class), wrap)
        model = wrap(model)
        if model._handle is not None and "auto_wrap_policy" not in self.kwargs:
            raise SalsaError(
                f"FSDP1Strategy: {type(model.module).__name__} holds parameters of its own, "
                "outside every model; hold them in a submodule."
            )
        _move_torchmetrics_to_device(model, device)
        from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing

        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        plugin = self.precision_plugin
        if isinstance(plugin, RootClippingFSDPPrecision):
            plugin.root = model
        return model

    def backward(
        self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any
    ) -> Any:
        # A manual-optimization step (SALSA-PPO) runs its backward passes inside the root's
        # forward, where FSDP has not hooked the loss: hook it as FSDP hooks a root output, so
        # every backward ends with FSDP's final callback (gradients ready for the optimizer,
        # units back to idle for the next forward).
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp._common_utils import TrainingState
        from torch.distributed.fsdp._runtime_utils import _register_pre_backward_hooks

        root = self.model
        if (
            isinstance(root, FullyShardedDataParallel)
            and root.training_state == TrainingState.FORWARD_BACKWARD
        ):
            # The root holds no parameters (every model is in units): nothing of it to reshard.
            root.training_state = TrainingState.IDLE
            _register_pre_backward_hooks(root, root, closure_loss, None)
        return super().backward(closure_loss, optimizer, *args, **kwargs)
