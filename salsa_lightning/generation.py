"""Sampling responses and reading their log-probabilities: shared by SALSA-PPO and evaluation."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from salsa_lightning.compiling import allow_recompiles, eager_unless_compiled, transformer_stack
from salsa_lightning.data.chat import IGNORE_INDEX
from salsa_lightning.errors import SalsaError, check_choices
from salsa_lightning.functional import (
    TiedGradient,
    inverse_cdf_sample,
    logprobs_from_hidden,
    logprobs_from_logits,
    response_mask,
    truncate_after_eos,
)
from salsa_lightning.lora import unwrap_peft
from salsa_lightning.sharding import fsdp_kind, gathered, whole_after_forward

Cache = Literal["auto", "static", "dynamic"]
Gather = Literal["once", "per_layer"]


@dataclass
class GenerationSettings:
    """How responses are sampled.

    Attributes:
        max_new_tokens: Longest response.
        temperature: Sampling temperature (log-probs are computed at the same temperature).
        top_p: Nucleus sampling threshold (1.0: off).
        stop_at_eos: Stop decoding once every response has emitted EOS and mask what follows.
            Off (benchmarks, so every system generates the same number of tokens), every
            response is ``max_new_tokens`` long and EOS is an ordinary token.
        do_sample: Sample (PPO's default); False decodes greedily (deterministic evaluation).
        cache: KV cache for decoding. ``"static"``: :class:`StaticDecoder`, a fixed-size
            cache and, on a GPU, one compiled forward per token replayed as a CUDA graph, so
            decoding is not bound by Python overhead; ``"dynamic"``: ``generate`` with its
            growing cache; ``"auto"``: static on one CUDA device, dynamic on CPU. Greedy,
            both decode the same tokens; sampled, they draw from the same distribution (the
            StaticDecoder by inverse transform, ``generate`` by ``multinomial``: other draws
            under one seed). The log-probs used for training are always recomputed by a plain
            forward pass. ``gather: per_layer`` decodes through ``generate`` whatever this says.
        compile: Compile the :class:`StaticDecoder`'s per-token step and its prompt forward on
            the CPU too (``torch.compile``, inductor's C++ kernels; on a GPU the per-token
            forward is always compiled), and
            under ``cache: "auto"`` decode with it there. For small models, whose decoding is
            bound by Python overhead: on the tiny preset of ``benchmarks/grpo_vs_trl.py`` it
            decodes about 3x faster; the first rollout of each shape pays the compilation
            (about 15 s for the tiny model on the 2-core CPU). Needs a C++ compiler; where
            compiling fails the model falls back to ``generate`` with a warning.
        gather: How a policy that FSDP shards is decoded. ``"once"``: every FSDP unit is
            all-gathered once per rollout and held whole until the last token
            (``sharding.gathered``): one full copy of the policy per rank while decoding, no
            collective per token, so each rank stops at its own EOS and ``cache`` applies as
            on one device. ``"per_layer"``: through FSDP's hooks, each decoding step gathers
            and frees every unit again and the ranks decode in lockstep (``generate`` with
            ``synced_gpus``); for a policy too large to hold whole on one device. No effect
            on a model that is not sharded.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop_at_eos: bool = True
    do_sample: bool = True
    cache: Cache = "auto"
    gather: Gather = "once"
    compile: bool = False

    def __post_init__(self) -> None:
        check_choices("generation", type(self), self)
        if self.max_new_tokens < 1:
            raise SalsaError(
                f"generation.max_new_tokens must be at least 1, got {self.max_new_tokens}."
            )
        if not self.temperature > 0:
            raise SalsaError(
                f"generation.temperature must be positive, got {self.temperature} (for greedy "
                "decoding set generation.do_sample false; log-probs are read at the temperature)."
            )
        if not 0 < self.top_p <= 1:
            raise SalsaError(f"generation.top_p must be in (0, 1], got {self.top_p}.")


# The static cache's prompt length is a multiple of this (shorter prompts are left-padded), so
# batches of slightly different prompt lengths reuse one compiled decoding graph; the cache only
# grows, so a run compiles again only when a batch's prompts are longer than any before. 16, not
# 32: at most 15 pad positions in the prefill and in every token's attention, where 32 padded
# 16-token prompts to 32 and the RL YAMLs' longest, 48, to 64. The tiny benchmark's 32-token
# rollout of 16 prompts of 16 tokens: 7.1-7.5 ms against 8.1-8.5 (one thread, CPU).
STATIC_PROMPT_BUCKET = 16


def use_static_cache(
    cache: Cache, device: torch.device, lockstep: bool, compile: bool = False
) -> bool:
    """Whether ``sample`` decodes with the :class:`StaticDecoder`: never in lockstep (a policy
    that FSDP gathers layer by layer at every step decodes through ``generate``), under
    ``"auto"`` on CUDA, and on the CPU when its step is compiled."""
    if lockstep or cache == "dynamic":
        return False
    return cache == "static" or device.type == "cuda" or compile


def pad_left(ids: Tensor, mask: Tensor, length: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad [B, P] ids and mask to [B, length] (P <= length)."""
    extra = length - ids.shape[1]
    return (
        torch.nn.functional.pad(ids, (extra, 0), value=pad_id),
        torch.nn.functional.pad(mask, (extra, 0), value=0),
    )


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as generation used them: [B, T] -> [B, T]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample(
    model: nn.Module,
    tokenizer: Any,
    query: Tensor,
    query_mask: Tensor,
    settings: GenerationSettings,
) -> tuple[Tensor, Tensor]:
    """Sample one response per left-padded prompt with the KV cache.

    A model that FSDP shards (FSDP2 or FSDP1, seen on the model itself) is gathered once for
    the whole rollout and decoded as on one device (``settings.gather`` ``"once"``), or
    decoded through FSDP's per-layer gathers with every rank in lockstep (``"per_layer"``).

    Args:
        model: A causal LM (or peft model) with ``generate``.
        tokenizer: Gives the EOS and pad ids.
        query: [B, P] prompt ids, left-padded.
        query_mask: [B, P] attention mask of the prompts.
        settings: Sampling settings.

    Returns:
        ``(response, mask)``: [B, R] ids with pad after the first EOS, and the [B, R] float mask
        that is 1 up to and including that EOS (all ones when ``stop_at_eos`` is off).
    """
    s = settings
    eos = tokenizer.eos_token_id if s.stop_at_eos else None
    lockstep = s.gather == "per_layer" and fsdp_kind(model) is not None
    with gathered(model, layers=not lockstep):
        response = decode(model, tokenizer, query, query_mask, s, eos, lockstep)
    if eos is None:
        return response, torch.ones_like(response, dtype=torch.float32)
    return truncate_after_eos(response, eos, tokenizer.pad_token_id)


class NonFiniteLogits(RuntimeError):
    """The model's next-token logits held a NaN or an infinity while decoding."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(f"{type(model).__name__}'s next-token logits are non-finite")


def decode(
    model: nn.Module,
    tokenizer: Any,
    query: Tensor,
    query_mask: Tensor,
    s: GenerationSettings,
    eos: int | None,
    lockstep: bool,
) -> Tensor:
    """[B, R] sampled tokens (continuing with pad after ``eos``): the :class:`StaticDecoder`
    when the cache setting picks it, else ``generate``, in lockstep across ranks when asked
    (no rank may stop before the others while each step runs collectives). Non-finite logits
    raise :class:`NonFiniteLogits` on either path."""
    static = use_static_cache(s.cache, query.device, lockstep, s.compile)
    if static and not static_failed(model):
        try:
            decoder = static_decoder(model, query.shape[0], s.max_new_tokens, s.compile)
            with eager_unless_compiled(model, decoder.compiles_on(query.device)):
                return decoder(query, query_mask, s, eos, tokenizer.pad_token_id)
        except NonFiniteLogits:
            raise
        except Exception as err:  # compiling depends on the model and the torch build
            model.__dict__[STATIC_FAILED] = repr(err)
            warnings.warn(
                f"StaticDecoder failed for {type(model).__name__} ({err!r}); this model decodes "
                "with generate (and its own static cache) from now on.",
                stacklevel=3,
            )
    kwargs = {"temperature": s.temperature, "top_p": s.top_p, "top_k": 0} if s.do_sample else {}
    if static:  # generate compiles its forward for a static cache on a GPU
        kwargs["cache_implementation"] = "static"
    synced = lockstep and dist.is_initialized() and dist.get_world_size() > 1
    try:
        with eager_unless_compiled(model, False):  # a model.compile stack, per cache state
            out = model.generate(
                input_ids=query,
                attention_mask=query_mask,
                do_sample=s.do_sample,
                max_new_tokens=s.max_new_tokens,
                eos_token_id=eos,  # None: EOS is an ordinary token, every response is full length
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                synced_gpus=synced,  # False stated: transformers turns it on for any FSDP module
                **kwargs,
            )
    except RuntimeError as err:  # torch.multinomial on non-finite probabilities
        if "probability tensor contains" not in str(err):
            raise
        raise NonFiniteLogits(model) from err
    return out[:, query.shape[1] :]


def next_tokens(logits: Tensor, settings: GenerationSettings, uniform: Tensor | None) -> Tensor:
    """[B, V] next-token logits -> [B] tokens: greedy, or sampled from the logits warped by
    transformers' own temperature and top-p processors (``generate``'s distribution), by
    inverse transform sampling with ``uniform``'s [B] numbers (one per row; ``generate``'s
    ``multinomial`` draws one per vocabulary entry, so the draws differ from its draws under
    one seed)."""
    if not settings.do_sample:
        return logits.argmax(-1)
    probs = warpers(settings)(None, logits.float()).softmax(-1)
    return inverse_cdf_sample(probs, uniform)


def warpers(settings: GenerationSettings) -> LogitsProcessorList:
    """The logits warpers ``generate`` applies for these settings (none at temperature 1 and
    top-p 1)."""
    out = LogitsProcessorList()
    if settings.temperature != 1.0:
        out.append(TemperatureLogitsWarper(float(settings.temperature)))
    if settings.top_p < 1.0:
        out.append(TopPLogitsWarper(float(settings.top_p)))
    return out


# Inductor's options for the StaticDecoder's step on the CPU. cpp_wrapper: the compiled graph
# calls its kernels from C++, not from generated Python that views, checks and allocates each
# buffer in turn (about 90 Python calls a token for the tiny model): 36 against 57 ms per
# 32-token rollout of 16 on the tiny benchmark model (one thread; benchmarks/grpo_vs_trl.py).
CPU_COMPILE = {"cpp_wrapper": True}


class StaticDecoder:
    """Decode with a fixed-size KV cache and fixed shapes, so that on a GPU the forward of each
    new token is compiled once and replayed as a CUDA graph (no per-token Python overhead in
    the model), and on the CPU (``compile``) the whole step and the prompt's forward are
    compiled. Prompts are left-padded to the cache's prompt length, so one compiled graph
    serves every batch of ``batch`` prompts up to that length.

    The cache stays allocated between calls (``2 x layers x batch x length x kv width``); a
    longer prompt re-creates it (and compiles again).
    """

    def __init__(self, model: nn.Module, batch: int, new_tokens: int, compile: bool) -> None:
        self.model, self.batch, self.new_tokens = model, batch, new_tokens
        self.compile_on_cpu = compile
        self.cache_argument = cache_argument(model)
        self.prompt_length = 0
        self.cache: Any = None
        self.step = self.advance
        self.prefill = self.forward  # compiled on the CPU like the step (see _fit)
        self.logits = self.forward  # on a GPU, a CUDA graph of the forward (see _fit)
        self.compiled = False  # CUDA graphs: each replay overwrites the last one's outputs

    def forward(
        self, ids: Tensor, mask: Tensor, position: Tensor, cache_position: Tensor
    ) -> Tensor:
        """One forward through the cache -> [B, V] logits of the last position."""
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position,
            cache_position=cache_position,
            **{self.cache_argument: self.cache},
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def advance(
        self,
        token: Tensor,
        mask: Tensor,
        position: Tensor,
        cache_position: Tensor,
        settings: GenerationSettings,
        uniform: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """One decoding step: ``token`` [B] through the cache -> the next [B] tokens
        (:func:`next_tokens`) and whether the logits they come from are all finite. On the CPU
        the whole step is compiled (picking and checking fuse into the forward's kernels); on a
        GPU the forward alone is a CUDA graph, and picking and checking follow it eagerly."""
        logits = self.logits(token[:, None], mask, position, cache_position)
        return next_tokens(logits, settings, uniform), torch.isfinite(logits).all()

    def compiles_on(self, device: torch.device) -> bool:
        """Whether decoding on ``device`` runs compiled code that traces the model: on a GPU the
        forward's CUDA graph, on the CPU (``compile``) the whole step."""
        return device.type == "cuda" or self.compile_on_cpu

    def _fit(self, prompt_length: int, device: torch.device) -> None:
        """Make the cache hold ``prompt_length`` prompt tokens (re-created, larger, if needed)."""
        if self.cache is not None and prompt_length <= self.prompt_length:
            self.cache.reset()
            return
        from transformers import StaticCache

        self.prompt_length = -(-prompt_length // STATIC_PROMPT_BUCKET) * STATIC_PROMPT_BUCKET
        self.cache = StaticCache(
            config=self.model.config, max_cache_len=self.prompt_length + self.new_tokens
        )
        if not self.compiles_on(device):
            return
        allow_recompiles()  # each decoder (batch size) and prompt bucket: graphs of one function
        if device.type == "cuda":
            # Not the whole step: with the pick inside, compiling failed for GPT-2 in bf16 on an
            # H200 (torch 2.11, Inductor: "list indices must be integers or slices, not
            # NoneType"), while a tiny Llama compiled; the forward alone compiled for both.
            self.logits = torch.compile(self.forward, mode="reduce-overhead", dynamic=False)
            self.compiled = True
        else:  # no CUDA graphs on the CPU: C++ kernels called from a C++ wrapper
            self.step = torch.compile(self.advance, dynamic=False, options=CPU_COMPILE)
            self.prefill = torch.compile(self.forward, dynamic=False, options=CPU_COMPILE)
            self._allocate(device)

    def _allocate(self, device: torch.device) -> None:
        """Allocate the new cache's tensors by one eager forward (of zeros), as the cache does in
        its first forward: a compiled prefill would otherwise compile for the empty cache, then
        again for the allocated one at the next rollout."""
        ids = torch.zeros(self.batch, self.prompt_length, dtype=torch.long, device=device)
        positions = torch.arange(self.prompt_length, device=device)
        mask = ids.new_ones(self.batch, self.prompt_length + self.new_tokens)
        self.forward(ids, mask, positions.expand(self.batch, -1), positions)
        self.cache.reset()

    def unchecked(self) -> AbstractContextManager:
        """Where the compiled step skips its guards. On the CPU the first step of a rollout
        checks them all (recompiling if the model or the grad mode changed since the last
        rollout) and the later steps, whose inputs differ from the first's in values only (the
        same shapes, weights and cache tensors), skip them (``skip_guard_eval_unsafe``): the
        check costs about 0.3 ms a token on the tiny benchmark model. The later steps run under
        one stance, entered once (entering one costs about 0.06 ms).
        On a GPU the step is not compiled as a whole, and its forward's CUDA graph checks."""
        if self.step == self.advance:  # a new bound method each read
            return nullcontext()
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)

    @torch.no_grad()
    def __call__(
        self,
        query: Tensor,
        query_mask: Tensor,
        settings: GenerationSettings,
        eos: int | None,
        pad: int,
    ) -> Tensor:
        """[B, P] left-padded prompts (B <= ``batch``) -> [B, new_tokens] tokens; after an
        EOS (when ``eos`` is given) a row continues with ``pad``, as ``generate`` pads
        finished rows."""
        rows = query.shape[0]
        self._fit(query.shape[1], query.device)
        query, query_mask = pad_left(query, query_mask, self.prompt_length, pad)
        if rows < self.batch:  # copies of the first prompt fill the fixed batch, then are dropped
            fill = self.batch - rows
            query = torch.cat([query, query[:1].expand(fill, -1)])
            query_mask = torch.cat([query_mask, query_mask[:1].expand(fill, -1)])
        n, length = self.new_tokens, self.prompt_length
        mask = torch.cat([query_mask, query_mask.new_ones(self.batch, n)], 1)  # causal covers
        positions = position_ids(query_mask)
        logits = self.prefill(query, mask, positions, torch.arange(length, device=query.device))
        if not self.cache.get_seq_length():  # the model ignored the cache: decoding would be wrong
            raise SalsaError(
                f"{type(self.model).__name__} did not write the prompt into the StaticCache "
                f"passed as {self.cache_argument}="
            )
        position = positions[:, -1:]
        cache_position = torch.full((1,), length - 1, device=query.device)
        tokens = query.new_full((self.batch, n), pad)
        finished = torch.arange(self.batch, device=query.device) >= rows  # the fillers: done

        def uniform() -> Tensor | None:  # the sampling noise (greedy draws none)
            return torch.rand(self.batch, device=query.device) if settings.do_sample else None

        token = next_tokens(logits, settings, uniform())
        finite = torch.isfinite(logits).all()  # read once, after the loop: no sync per token
        with ExitStack() as steps:  # the steps after the first skip the guards
            for i in range(n):
                if eos is not None:
                    token = token.masked_fill(finished, pad)
                    finished |= token == eos
                tokens[:, i] = token
                # Every row done? Asked every 16 tokens only, as asking waits for the GPU.
                if i + 1 == n or (eos is not None and i % 16 == 15 and bool(finished.all())):
                    break
                position, cache_position = position + 1, cache_position + 1  # on the device
                if self.compiled:  # the logits of the last replay are no longer read
                    torch.compiler.cudagraph_mark_step_begin()
                if i == 1:
                    steps.enter_context(self.unchecked())
                token, ok = self.step(token, mask, position, cache_position, settings, uniform())
                finite &= ok
        if not bool(finite):
            raise NonFiniteLogits(self.model)
        tokens = tokens[:rows]
        if eos is None:
            return tokens
        # As generate: stop after the step where the last row emitted its EOS.
        return tokens[:, : int(response_mask(tokens, eos).sum(-1).max())]


def cache_argument(model: nn.Module) -> str:
    """The name of the KV-cache argument of ``model``'s forward: ``cache`` in recent
    transformers 5 releases, ``past_key_values`` in earlier ones (whose forward silently drops an
    unknown ``cache=`` into its keyword arguments and decodes with no cache at all)."""
    base = unwrap_peft(model)
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


STATIC_FAILED = "_salsa_static_decoder_failed"


def static_failed(model: nn.Module) -> str | None:
    """The error that made ``model`` fall back from static-cache decoding, if one did."""
    return model.__dict__.get(STATIC_FAILED)


def static_decoder(
    model: nn.Module, batch: int, new_tokens: int, compile: bool = False
) -> StaticDecoder:
    """A :class:`StaticDecoder` of the model for ``batch`` prompts (or more: a smaller batch,
    such as an epoch's last, is padded up to it) and this response length. Decoders stay on the
    model, so caches and compiled graphs serve every later rollout and validation batch."""
    decoders = model.__dict__.setdefault("_salsa_static_decoders", {})
    fits = [
        d
        for d in decoders.values()
        if d.new_tokens == new_tokens and d.batch >= batch and d.compile_on_cpu == compile
    ]
    if fits:
        return min(fits, key=lambda d: d.batch)
    decoders[batch, new_tokens, compile] = StaticDecoder(model, batch, new_tokens, compile)
    return decoders[batch, new_tokens, compile]


def response_logits(
    model: nn.Module, sequence: Tensor, attention_mask: Tensor, n: int, **kwargs: Any
) -> Any:
    """Run ``model`` on [B, P + n] ids keeping only the logits that predict the last ``n``
    tokens: the output's ``logits`` are [B, n, V] (never the whole sequence's, nor the last
    position's, which predicts past the response)."""
    length = sequence.shape[1]
    return model(
        input_ids=sequence,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        logits_to_keep=torch.arange(length - n - 1, length - 1, device=sequence.device),
        use_cache=False,
        **kwargs,
    )


# Config fields of models whose logits are not the output layer's alone (Gemma 2's soft-capping,
# Cohere's and Granite's scales): their log-probs come from the model's own logits.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def output_layer(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """``(decoder, head)`` of a causal LM (peft-wrapped too) whose logits are ``head`` (a plain
    ``nn.Linear``) of the decoder's last hidden states, so that log-probs can be taken from the
    hidden states in tiles (:func:`last_hidden_states`,
    :func:`~salsa_lightning.functional.logprobs_from_hidden`); None for a head with adapters, a
    model that transforms its logits, or a head that is sharded again after the model's
    forward (FSDP1's units; :func:`~salsa_lightning.sharding.whole_after_forward`)."""
    base = unwrap_peft(model)
    head, decoder = base.get_output_embeddings(), transformer_stack(model)
    if type(head) is not nn.Linear or decoder is None:
        return None
    if any(getattr(base.config, k, None) not in (None, 1, 1.0) for k in LOGIT_TRANSFORMS):
        return None
    return (decoder, head) if whole_after_forward(model, head) else None


def tied_embedding(model: nn.Module, head: nn.Linear) -> nn.Embedding | None:
    """``model``'s input embedding when it shares ``head``'s weight, that weight trains, and it
    is a plain ``nn.Embedding`` lookup (no max-norm, frequency scaling or sparse gradient;
    Gemma's scaled embedding is left to autograd), so that :class:`TiedGradient` can sum the
    weight's two gradients in one tensor; else None."""
    base = unwrap_peft(model)
    embedding = base.get_input_embeddings()
    if type(embedding) is not nn.Embedding or embedding.weight is not head.weight:
        return None
    if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
        return None
    return embedding if embedding.weight.requires_grad else None


@contextmanager
def tied_gradient(model: nn.Module, head: nn.Linear) -> Iterator[TiedGradient | None]:
    """While grad is on and ``head``'s weight is also the input embedding
    (:func:`tied_embedding`): a :class:`TiedGradient` through which the forwards of ``model``
    inside the block look their tokens up, for
    :func:`~salsa_lightning.functional.logprobs_from_hidden` (``tied=``) to finish; else None.
    On gpt2-small it spares a second [V, H] gradient (147 MiB in float32) at the peak of
    backward, and zeroing and adding it."""
    embedding = tied_embedding(model, head) if torch.is_grad_enabled() else None
    if embedding is None:
        yield None
        return
    tied = TiedGradient()

    def lookup(module: nn.Embedding, args: tuple, out: Tensor) -> Tensor:
        return tied.lookup(args[0], module.weight, module.padding_idx)

    hook = embedding.register_forward_hook(lookup)
    try:
        yield tied
    finally:
        hook.remove()


def last_hidden_states(model: nn.Module, decoder: nn.Module, **inputs: Any) -> Tensor:
    """The ``decoder``'s last hidden states [B, T, H] from a forward of the whole ``model``
    (its own forward: FSDP's gathers and backward hooks, peft's adapters) whose head computes
    the last position's logits alone. Under FSDP2 the head's weight is whole after it
    (:func:`output_layer`), for the tiles to use."""
    states: list[Tensor] = []
    hook = decoder.register_forward_hook(lambda module, args, out: states.append(out[0]))
    try:
        model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    return states[-1]


@dataclass
class LabelledStates:
    """A forward's last hidden states ``states`` [N, H] at the N positions whose next token is
    labelled, those ``targets`` [N], the batch ``rows`` [N] they sit in, and the ``tied``
    gradient of a tied head (:func:`tied_gradient`) for the tiles to finish."""

    states: Tensor
    targets: Tensor
    rows: Tensor
    tied: TiedGradient | None


def labelled_states(
    model: nn.Module,
    layer: tuple[nn.Module, nn.Linear],
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
) -> LabelledStates:
    """The positions of a batch that predict a labelled token (``labels`` other than
    ``IGNORE_INDEX``; position t predicts token t + 1), from a forward of ``model`` whose
    output layer is ``layer`` (:func:`output_layer`): for log-probs in tiles of those alone."""
    decoder, head = layer
    with tied_gradient(model, head) as tied:
        states = last_hidden_states(
            model, decoder, input_ids=input_ids, attention_mask=attention_mask
        )
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return LabelledStates(states[rows, cols], targets[rows, cols], rows, tied)


@dataclass
class ResponseScores:
    """A policy pass over prompt + response: the response tokens' ``logprobs`` [B, R], their
    ``logits`` [B, R, V] (None when taken in tiles from the hidden states) and, when asked
    for, the ``hidden`` [B, R, H] last hidden states that predict them."""

    logprobs: Tensor
    logits: Tensor | None
    hidden: Tensor | None


def score_response(
    model: nn.Module,
    sequence: Tensor,
    attention_mask: Tensor,
    response: Tensor,
    temperature: float = 1.0,
    hidden: bool = False,
    logits: bool = False,
) -> ResponseScores:
    """Log-probs of the response tokens (the last R of ``sequence``) under ``model``: from the
    last hidden states in tiles when the model's output layer allows it (:func:`output_layer`)
    and ``logits`` are not asked for, else from the model's response logits. On gpt2-small
    with 32 responses of 128 tokens the logits alone are 412 MB in bf16, and their gradient as
    much again; the tiles hold one float32 [256, V] at a time."""
    n, layer = response.shape[1], None if logits else output_layer(model)
    if layer is None:
        out = response_logits(model, sequence, attention_mask, n, output_hidden_states=hidden)
        last = out.hidden_states[-1][:, -n - 1 : -1] if hidden else None
        return ResponseScores(
            logprobs_from_logits(out.logits, response, temperature), out.logits, last
        )
    decoder, head = layer
    with tied_gradient(model, head) as tied:
        states = last_hidden_states(
            model,
            decoder,
            input_ids=sequence,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
        )[:, -n - 1 : -1]
    logprobs = logprobs_from_hidden(
        states, head.weight, head.bias, response, temperature, tied=tied
    )
    return ResponseScores(logprobs, None, states if hidden else None)


@torch.no_grad()
def response_logprobs(
    model: nn.Module,
    sequence: Tensor,
    attention_mask: Tensor,
    response: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """[B, R] log-probs of the response tokens (the last R of ``sequence``) under ``model``."""
    return score_response(model, sequence, attention_mask, response, temperature).logprobs
