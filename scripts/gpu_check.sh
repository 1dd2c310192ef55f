#!/usr/bin/env bash
# The prepared GPU check (< 9 min on one CUDA GPU): the tests marked `gpu`, then the paper-shape
# bench; JSON/XML/logs into $OUT (the device tool's folder) or the folder given as $1.
# The GPU machine has torch, transformers, peft, accelerate and pandas but no network and no hydra,
# omegaconf or submitit launcher (our launcher plugin imports it): `make wheelhouse` here, carry
# wheelhouse/ with the tree, and this script installs it with `pip install --no-index`.
#   run: bash scripts/gpu_check.sh        (device tool: carry=["wheelhouse"], timeout_s=560)
# REHEARSE=1 runs the same on this CPU at toy size (one block, 64 tokens): scripts/gpu_rehearsal.sh does,
# in a venv with the GPU image's transformers and accelerate, so an API change shows before device time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-results/gpu}}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
start=$(date +%s)
# the rehearsal's bench runs in fp32 (given last, it wins): a CPU without AVX-512 BF16 takes minutes for one
# bf16 product at Llama3's vocabulary; the tests marked gpu rehearse bf16 and bf16-mixed training
if [ "${REHEARSE:-0}" = 1 ]; then
  export SPEFT_TEST_DEVICE=cpu; SHAPE="--layers 1 --seq-len 64 --steps 1 --device cpu"; LAST="--precisions fp32"
  SPEFT_BATCH="--batch-size 2"; BUDGET=3600
else
  SHAPE="--layers 32 --steps 2 --device cuda"; LAST=""; SPEFT_BATCH="--batch-size 16 --seq-len 512"; BUDGET=520
fi
python - <<'PY' || pip install --no-index --find-links wheelhouse -q hydra-core omegaconf hydra-submitit-launcher pytest
import hydra, omegaconf, hydra_plugins.hydra_submitit_launcher, pytest  # noqa: F401
PY
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python -c \
  "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"; } \
  > "$OUT/environment.txt" 2>&1
timeout 300 python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py --junitxml="$OUT/gpu_tests.xml" \
  > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?
# The paper-shape bench at full depth, most decisive first (issue 14): SPSFT Table 7's Llama2-7B column
# (fp32); SPEFT vs LoRA r=64 and each salience metric's peak at the Llama3-8B shape in bf16 (issue 14's
# "SPEFT paper's setting", at Table 7's 1 × 2,048 tokens); Table 7's Llama3-8B column; then those SPEFT rows
# at the SPEFT paper's own Llama3-8B batch, 16 × 512 tokens (its Table 8: CodeFeedback, max length 512), in
# a JSON of their own (one batch a file). Each command resumes its JSON, which gets every row as it
# finishes, and has what is left of the script's 520 s (BUDGET).
# bench ARGS: one bench command into $OUT/paper_shape.json (a later --out in ARGS wins: argparse keeps the last)
bench() {
  local left=$((BUDGET - ($(date +%s) - start)))
  [ "$left" -gt 30 ] || return 124
  timeout "$left" python scripts/bench_paper_shape.py $SHAPE \
    --out "$OUT/paper_shape.json" "$@" $LAST >> "$OUT/paper_shape.log" 2>&1
}
bench_rc=0
TABLE7="floor lora lora_dropout0.1 spsft fa_lora fa_spsft dora"
bench --models llama2_7b --precisions fp32 --variants $TABLE7 || bench_rc=$?
bench --models llama3_8b --precisions bf16 --variants floor lora speft_sampled speft_dense \
  --salience magnitude gradient fisher synflow grasp || bench_rc=$?
bench --models llama3_8b --precisions fp32 --variants $TABLE7 || bench_rc=$?
bench --models llama3_8b --precisions bf16 --variants lora speft_sampled speft_dense \
  --salience gradient grasp magnitude fisher synflow $SPEFT_BATCH --out "$OUT/paper_shape_speft_batch.json" || bench_rc=$?
printf '{"tests_rc": %s, "bench_rc": "%s", "wall_s": %s}\n' "$tests_rc" "$bench_rc" "$(( $(date +%s) - start ))" \
  | tee "$OUT/summary.json"
tail -3 "$OUT/gpu_tests.log"
