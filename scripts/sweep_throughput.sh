#!/usr/bin/env bash
# Sweep throughput on this machine: the same two runs (STS-B twin, SPEFT-gradient, seeds 1 and 2) as
# 1 job x 2 threads (Hydra's basic launcher) and as 2 jobs x 1 thread (hydra/launcher=local).
# Writes results/bench/sweep_throughput.json.  Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
tmp=$(mktemp -d)
common="experiment=cpu_minilm_glue method=speft metric=gradient task=stsb train.seed=1,2"
s=$(date +%s.%N)
WANDB_MODE=disabled $PY -m speft_bench --multirun $common paths.output_dir=$tmp/a > $tmp/a.log 2>&1
m=$(date +%s.%N)
WANDB_MODE=disabled $PY -m speft_bench --multirun $common hydra/launcher=local train.num_threads=1 \
    paths.output_dir=$tmp/b > $tmp/b.log 2>&1
e=$(date +%s.%N)
$PY - "$tmp" "$s" "$m" "$e" <<'PY'
import json, sys
from pathlib import Path
tmp, s, m, e = sys.argv[1], *map(float, sys.argv[2:])
runs = {side: sorted((json.loads(p.read_text()) for p in Path(tmp, side).rglob("record.json")),
                     key=lambda r: r["config"]["train"]["seed"]) for side in ("a", "b")}
out = {"command": "bash scripts/sweep_throughput.sh", "runs_per_setting": 2,
       "one_job_two_threads_s": round(m - s, 1), "two_jobs_one_thread_s": round(e - m, 1),
       "speedup_two_jobs": round((m - s) / (e - m), 2),
       "pearson": {side: [r["metrics"]["pearson"] for r in rs] for side, rs in runs.items()}}
Path("results/bench/sweep_throughput.json").write_text(json.dumps(out, indent=2) + "\n")
print(json.dumps(out, indent=2))
PY
rm -rf "$tmp"
