#!/usr/bin/env bash
# The install check: build the wheel, install it (not editable) into a fresh virtual
# environment, and run the documented commands from an empty directory, as a user who
# installed the package would: the packaged configs, the shipped base model and the embedded
# task's files must all resolve without the checkout. Usage: bash .ci/install_check.sh [WORKDIR]
# (default: a temporary folder, removed at the end).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -ge 1 ]; then work="$1"; rm -rf "$work/wheel" "$work/venv" "$work/empty"; mkdir -p "$work"
else work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT; fi
step() { printf '\n== install check: %s (%ds)\n' "$1" "$SECONDS"; }

step "build the wheel"
python -m pip wheel -q --no-deps -w "$work/wheel" "$repo"

step "a fresh virtual environment: torch from the local file, then the wheel"
python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q torch==2.13.0
"$work/venv/bin/python" -m pip install -q "$work"/wheel/salsa_lightning-*.whl

# Only the venv's salsa, nothing from the checkout. Torch's default threads: CI runs its steps one
# after another on an otherwise idle machine, where 2 threads are about twice as fast as one (60
# SFT steps: 33 s against 66 s). On 2 cores that other jobs share, set OMP_NUM_THREADS=1: there
# 2 threads were 6 to 9 times slower (sft-1 of the quickstart: 158 s against over 20 min).
export PATH="$work/venv/bin:$PATH" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
unset PYTHONPATH
mkdir "$work/empty" && cd "$work/empty"
python -c 'import salsa_lightning as s; assert "site-packages" in s.__file__, s.__file__; print(s.__file__)'

step "salsa configs list"
salsa configs list | tee "$work/list.txt"
grep -q "smollm2/pipeline.yaml" "$work/list.txt"

step "salsa configs copy sft.yaml ."
salsa configs copy sft.yaml .
test -f sft.yaml

step "salsa fit --config sft.yaml --trainer.max_steps 2"
salsa fit --config sft.yaml --trainer.max_steps 2 --trainer.enable_progress_bar false
test -f artifacts/sft-1/model.safetensors
rm -rf artifacts

step "salsa quickstart --help"
salsa quickstart --help

step "salsa quickstart (the whole experiment, from the packaged configs)"
salsa quickstart --output qs 2>&1 | tee "$work/quickstart.log"
grep -q "using the packaged .*quickstart.yaml" "$work/quickstart.log"
test -f qs/artifacts/report/report.md
test -f qs/artifacts/report/summary.json
test -f qs/artifacts/report/frontier.png
python -c "import json; s = json.load(open('qs/artifacts/report/summary.json')); print({k: s[k] for k in ('sft_gold', 'ppo_gold', 'salsa_gold')})"

step "done"
echo "install_check: 5 passed, 0 failed"  # configs list, configs copy, fit, quickstart --help, quickstart
