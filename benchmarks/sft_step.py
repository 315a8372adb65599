"""An SFT step (forward and backward) side by side: the loss and token accuracy from the labelled
positions' last hidden states in tiles (``sft.model_token_stats``, what ``SFTModule`` trains with)
against the model's ``[B, T, V]`` logits (``sft.token_stats``, what it trained with before).

``--preset base`` is the shipped tiny model (vocabulary 359, untied head); ``gpt2-small`` GPT-2
small's shape with random weights (124M parameters, vocabulary 50257, head tied to the
embedding). Each mode runs in its own process, the modes alternating over ``--repeats``, on one
torch thread; each process takes one step to warm up, then ``--steps`` timed steps of ``--batch``
rows of ``--length`` random tokens whose last three quarters are labelled. Memory is the peak
RSS (VmHWM) above the RSS after the warm-up step (the model, its gradients and the allocator's
cache by then).

The LAST line is JSON: per mode the median seconds a step and the peak above, then
``ratio_step_s`` and ``ratio_peak_memory`` (tiles / logits). Usage::

    python benchmarks/sft_step.py --preset gpt2-small    # 4 x 256 tokens
    python benchmarks/sft_step.py --preset base --batch 16 --length 64 --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import rss_mib  # noqa: E402

MODES = ("tiles", "logits")


def child(mode: str, preset: str, batch: int, length: int, steps: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from salsa_lightning.data import IGNORE_INDEX
    from salsa_lightning.embedded import ASSETS
    from salsa_lightning.sft import model_token_stats, token_stats

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if preset == "base":
        model = AutoModelForCausalLM.from_pretrained(ASSETS / "base")
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2"))
    model.eval()  # no dropout: both modes compute the same function
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, length))
    labels = ids.clone()
    labels[:, : length // 4] = IGNORE_INDEX
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def step() -> float:
        model.zero_grad(set_to_none=True)
        if mode == "tiles":
            loss = model_token_stats(model, inputs, labels)[0]
        else:
            loss = token_stats(model(**inputs).logits, labels)[0]
        loss.backward()
        return float(loss)

    step()
    settled = rss_mib()
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    peak = rss_mib("VmHWM") - settled
    return {"mode": mode, "step_s": statistics.median(times), "peak_mib": peak, "loss": losses[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["base", "gpt2-small"], default="gpt2-small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.preset, args.batch, args.length, args.steps)))
        return
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", mode]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"the {mode} child failed:\n{res.stderr[-3000:]}")
            run = {**json.loads(res.stdout.splitlines()[-1]), "repeat": repeat}
            print(json.dumps(run), flush=True)
            runs[mode].append(run)
    summary = {
        mode: {
            "step_s": statistics.median(r["step_s"] for r in rs),
            "peak_mib": statistics.median(r["peak_mib"] for r in rs),
        }
        for mode, rs in runs.items()
    }
    tiles, logits = summary["tiles"], summary["logits"]
    result = {
        "settings": vars(args) | {"child": None},
        **summary,
        "ratio_step_s": round(tiles["step_s"] / logits["step_s"], 3),
        "ratio_peak_memory": (
            round(tiles["peak_mib"] / logits["peak_mib"], 3) if logits["peak_mib"] > 0 else None
        ),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
