#!/usr/bin/env bash
# Rehearse scripts/gpu_check.sh on this CPU before spending device time (a lent GPU has 15 minutes a
# task).  A venv with the lent machine's libraries: transformers 5.17.0, accelerate 1.15.0, and peft,
# pandas, pytest, cloudpickle; torch 2.13's CPU build stands in for its 2.11+cu130.  Hydra and the
# launcher come from wheelhouse/ with --no-index, as there.  Then the check itself with REHEARSE=1: the
# tests marked gpu on the CPU and every bench command at one block and 64 tokens, so an import or API
# break shows here, not on the GPU.
#   bash scripts/gpu_rehearsal.sh [OUT]      (default results/gpu_rehearsal; ~17 min on 2 cores, 1 of it the venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu-rehearsal}
OUT=${1:-results/gpu_rehearsal}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 transformers==5.17.0 accelerate==1.15.0 peft pandas pytest cloudpickle
[ -d wheelhouse ] || make wheelhouse
PATH="$PWD/$VENV/bin:$PATH" REHEARSE=1 bash scripts/gpu_check.sh "$OUT"
