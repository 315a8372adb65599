"""Frozen models: never trained, in eval mode (Lightning restores each submodule's mode after
validation), never in a training checkpoint unless they move (a moving KL reference, which no
optimizer trains but the run changes); and dropout off for the models RL trains."""

from __future__ import annotations

from typing import Any

from torch import nn

# Set on a module whose parameters take no gradient but change during the run (a moving
# reference): they stay in training checkpoints.
MOVING = "salsa_moving"


def mark_moving(module: nn.Module) -> nn.Module:
    """Keep ``module``'s parameters in training checkpoints although they take no gradient: the
    run changes them outside the optimizer (a moving KL reference). Returned for chaining."""
    setattr(module, MOVING, True)
    return module


def keep_frozen_out_of_state_dict(module: nn.Module) -> None:
    """Make ``module.state_dict()`` skip parameters that do not train.

    Frozen weights (the soup reference, the reward model, a LoRA policy's base) are rebuilt
    from their recipe, so training checkpoints hold only what training changes. Applied as a
    state-dict hook, it holds for Lightning's plain and sharded (FSDP2, FSDP1) checkpoints alike; pair
    it with ``strict_loading = False``. Parameters of a module marked by :func:`mark_moving`
    stay: training changes them too.
    """

    def drop_frozen(
        mod: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
    ) -> None:
        moving = {id(p) for m in mod.modules() if getattr(m, MOVING, False) for p in m.parameters()}
        for name, param in mod.named_parameters():
            if not param.requires_grad and id(param) not in moving:
                # FSDP1 and activation checkpointing name their wrappers in parameter names,
                # not in state-dict keys.
                for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
                    name = name.replace(wrapper, "")
                state_dict.pop(prefix + name, None)

    module.register_state_dict_post_hook(drop_frozen)


def freeze(model: nn.Module) -> nn.Module:
    """``model`` with no gradients, in eval mode (returned for chaining)."""
    model.requires_grad_(False)
    return model.eval()


# Attribute names under which Hugging Face modules keep a dropout probability as a float (the
# attention's dropout is applied inside sdpa/eager attention, not by an nn.Dropout).
DROPOUT_ATTRIBUTES = ("attention_dropout", "attn_dropout", "dropout", "hidden_dropout")


def without_dropout(model: nn.Module) -> nn.Module:
    """Turn every dropout of ``model`` off, in train mode too (returned for chaining).

    RL samples, scores and updates one policy: with dropout on, the log-probs of the sampling,
    scoring and update passes would each be those of another random sub-network, and the PPO
    ratio of an unchanged policy would not be 1. TRL turns dropout off the same way."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in DROPOUT_ATTRIBUTES:
            value = getattr(module, name, None)
            if isinstance(value, float):
                setattr(module, name, 0.0)
    return model
