#!/usr/bin/env bash
# The CPU paper-shape measurements of BENCHMARKS.md (issue 14), resumable: every command appends its rows
# to results/bench/paper_shape_cpu.json and skips the rows already there.  The bf16 timings need the
# machine to themselves (stop any sweep); the rest is memory only (--steps 0), unaffected by load.
# Most decisive first: where LoRA's memory goes, Table 7's other rows, then the methods the paper lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BENCH="$PY scripts/bench_paper_shape.py --out results/bench/paper_shape_cpu.json --threads 2"
# SPSFT Table 7 at the Llama2-7B shape, fp32: floor, LoRA (dropout 0 and the paper's 0.1) and SPSFT
$BENCH --models llama2_7b --layers 1 2 4 --variants floor lora lora_dropout0.1 spsft --steps 1
# SPEFT vs LoRA r=64 at the Llama3-8B shape in bf16 (the SPEFT paper's setting), and each salience metric's peak
$BENCH --models llama3_8b --precisions bf16 --layers 1 2 --variants floor lora speft_sampled speft_dense \
  --salience magnitude gradient fisher grasp synflow --steps 3
$BENCH --models llama3_8b --precisions bf16 --layers 4 --variants floor lora speft_sampled speft_dense \
  --salience magnitude gradient fisher synflow --steps 3
# the same per block, the 128k-token embedding and head cut to 1,024 rows (at one block they are most of a
# step, and their step-to-step noise hides a block's), the machine to itself; in fp32: a CPU without
# AVX-512 BF16 runs bf16 matmuls on one core (add --precisions bf16 on one that has it)
$BENCH --models llama3_8b --precisions fp32 --layers 1 --variants lora speft_sampled speft_dense \
  --ablate small_vocab --steps 3
# where LoRA's memory goes: no key/value cache, no optimizer state (plain SGD)
$BENCH --models llama2_7b --layers 1 2 --variants lora lora_dropout0.1 spsft --ablate no_cache sgd --steps 0
# the rest of Table 7: DoRA and the FA (MLP-only) rows, then its Llama3-8B column
$BENCH --models llama2_7b --layers 1 2 4 --variants dora fa_lora fa_spsft --steps 0
$BENCH --models llama3_8b --layers 1 2 --variants floor lora lora_dropout0.1 dora spsft fa_lora fa_spsft --steps 0
# the methods Table 7 lacks (full fine-tuning at the Llama3-8B shape: 16 bytes per parameter of its 1.27B at
# one block, more than this machine holds)
$BENCH --models llama2_7b --layers 1 2 --variants pissa speft_sampled speft_dense supertuning shira full --steps 0
$BENCH --models llama3_8b --layers 1 2 --variants speft_sampled speft_dense supertuning shira --steps 0
$BENCH --models llama3_8b --layers 1 2 --variants pissa --steps 0  # its SVD init: 10–12 min a block on 2 cores
# GraSP at 4 blocks needs more than this machine's 24 GiB (its row says so)
$BENCH --models llama3_8b --precisions bf16 --layers 4 --variants --salience grasp --steps 3
