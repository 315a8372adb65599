"""Model soups: weight averages of SFT checkpoints fine-tuned from one base model.

SALSA uses a soup as the KL reference of PPO. The package builds soups three ways:

* :func:`write_soup` streams Hugging Face checkpoint directories into a new checkpoint
  directory (``salsa soup``). It reads one tensor per input at a time and writes each output
  tensor as soon as it is computed, so peak memory is about one tensor per input plus its
  float32 accumulator, whatever the model size.
* :func:`soup_state_dict` / :func:`load_soup` build the soup in memory (no disk round trip).
* :class:`SoupReference` is the YAML-facing recipe the PPO module takes as
  ``reference: {checkpoints: [...], weights: [...]}``.

Inputs are either full checkpoints (``config.json`` + ``model.safetensors`` or sharded
``model-0000x-of-0000y.safetensors`` + ``model.safetensors.index.json``) or PEFT LoRA adapter
directories (``adapter_config.json`` + ``adapter_model.safetensors``) on one local base model.
A LoRA soup is the weighted average of the *merged* models,
``W = W_base + sum_i w_i * s_i * B_i @ A_i``; averaging the A and B factors separately would
add cross terms ``B_i @ A_j`` and is never done.

Every bad input raises :class:`~salsa_lightning.errors.SalsaError` before anything is written.

- ``merge``: the arithmetic (weights, averages, merged and concatenated LoRA factors);
- ``plan``: the input checks, from config files and safetensors headers;
- ``files``: reading and writing safetensors one tensor at a time, content hashes;
- ``build``: :func:`write_soup`, :func:`load_soup`, :func:`soup_state_dict`;
- ``reference``: :class:`SoupReference`.
"""

from salsa_lightning.soup.build import load_soup, soup_state_dict, write_soup
from salsa_lightning.soup.merge import average_state_dicts, check_weights
from salsa_lightning.soup.plan import config_dir
from salsa_lightning.soup.reference import SoupReference

__all__ = [
    "SoupReference",
    "average_state_dicts",
    "check_weights",
    "config_dir",
    "load_soup",
    "soup_state_dict",
    "write_soup",
]
