#!/usr/bin/env bash
# The GPU checks (speed against TRL with each phase's roofline, GPU tests, FSDP), as run on a
# rented single-GPU machine (H100/H200) that has
# torch, transformers, lightning and peft but not datasets, trl or jsonargparse: those travel
# as wheels in .whl/ (see ../shared/ENVIRONMENT.md). Everything it measures lands in $OUT.
#   bash benchmarks/gpu_session.sh [bench] [tests] [fsdp] [sharded] [grpo] [update]   (none:
#   the first four; OUT: ./gpu-out; grpo, GRPO and RLOO against TRL 1.16, is described at
#   grpo_part below; update: the policy's update pass under FSDP2 at world size 1, log-probs
#   in tiles against the logits, benchmarks/sharded_update.py, about 2 min on an H200)
# bench: both GPU presets, ours against TRL with the roofline of each phase, and on gpt2-small
# ours-grpo beside them (about 4 min on an H200; each preset's JSON line lands in
# $OUT/<name>.json, to commit under benchmarks/results/); tests: the single-GPU tests
# (static-cache decoding, bf16 SALSA); fsdp: every stage under fsdp.yaml and fsdp1.yaml;
# sharded: decoding under fsdp.yaml at world size 1 (gather once, per layer) against the unsharded
# policy, benchmarks/sharded_generation.py (about 6 min on an H200; JSON lines in
# $OUT/sharded_*.json).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SALSA_GPU_REPORT="$OUT/gpu_report.jsonl"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || export PYTHONPATH="${PYTHONPATH:-}:$PWD"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, lightning, peft, datasets, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__, 'trl', trl.__version__)"
} 2>&1 | tee "$OUT/device.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name: exit $? after $((SECONDS - t0)) s"
  tail -n 1 "$OUT/$name.log" | grep '^{' > "$OUT/$name.json" || rm -f "$OUT/$name.json"
  grep -v -E "Loading weights|Writing model|it/s\]|examples/s\]" "$OUT/$name.log" | tail -n 25
}

pytest_gpu=(python3 -m pytest -m gpu -p no:cacheprovider -p no:warnings -q -s)

# --- grpo: ours (estimator grpo, then rloo) against TRL's newest GRPOTrainer / RLOOTrainer on
# gpt2-small, with each phase's roofline (benchmarks/grpo_vs_trl.py; about 4 min on an H200).
# TRL 1.16 cannot share /tmp/site with TRL 1.12 (the bench part's): its wheel (and, if this
# machine's is older than 1.10.1, accelerate's) travels in .whl-trl/ and is installed into
# /tmp/site-trl, which a small wrapper puts first on the TRL child's path (--trl-python).
# Each JSON line lands in $OUT/grpo_gpt2_<estimator>.json, to commit under benchmarks/results/.
grpo_part() {
  if [ ! -d .whl-trl ]; then echo "grpo: no .whl-trl/ (the trl 1.16.0 wheel)"; return 1; fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site-trl .whl-trl/*.whl || return 1
  printf '#!/bin/sh\nPYTHONPATH=/tmp/site-trl:${PYTHONPATH:-} exec python3 "$@"\n' > /tmp/trl-python
  chmod +x /tmp/trl-python
  for estimator in grpo rloo; do
    step "grpo_gpt2_$estimator" 200 python3 benchmarks/grpo_vs_trl.py --preset gpt2-small \
      --device cuda --estimator "$estimator" --trl-python /tmp/trl-python --timeout 120
  done
}

for what in ${@:-bench tests fsdp sharded}; do
  case $what in
    bench)
      step bench_gpt2 230 python3 benchmarks/ppo_vs_trl.py --preset gpt2-small --device cuda \
        --systems ours,trl,ours-grpo --timeout 140
      step bench_1b 230 python3 benchmarks/ppo_vs_trl.py --preset 1b --device cuda \
        --systems ours,trl --timeout 170 ;;
    tests) step gpu_tests 180 "${pytest_gpu[@]}" tests/test_gpu.py tests/test_generation.py ;;
    fsdp) step gpu_fsdp 240 "${pytest_gpu[@]}" tests/test_fsdp1.py ;;
    sharded)  # issue 22: one GPU, FSDP2 over a world of 1, bf16, 128 sampled tokens, no early stop.
      # auto: the StaticDecoder (CUDA graphs) for once and unsharded; dynamic: generate for all.
      sharded=(python3 benchmarks/sharded_generation.py --device cuda --world 1 --unsharded
               --prompt-length 64 --new-tokens 128 --repeats 2)
      step sharded_gpt2_static 150 "${sharded[@]}" --preset gpt2-small --batch 32 --cache auto
      step sharded_gpt2_dynamic 150 "${sharded[@]}" --preset gpt2-small --batch 32 --cache dynamic
      step sharded_1b 150 "${sharded[@]}" --preset 1b --batch 16 --cache auto ;;
    grpo) grpo_part ;;
    update)  # bf16, 32 rows of 64 + 128 tokens: the logits are [32, 128, V] in bf16
      update=(python3 benchmarks/sharded_update.py --device cuda --world 1 --batch 32
              --prompt-length 64 --response 128 --passes 3 --repeats 2)
      step update_gpt2 120 "${update[@]}" --preset gpt2-small
      step update_1b 150 "${update[@]}" --preset 1b --batch 16 ;;
    *) echo "unknown part $what (bench, tests, fsdp, sharded, grpo, update)"; exit 2 ;;
  esac
done
