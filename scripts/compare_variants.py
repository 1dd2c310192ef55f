"""How far the paper's formulas are from the authors' code: Jaccard overlap of the masks each chooses.

On MiniLM-L6 / MRPC, loaded, seeded and sampled exactly as a run of the harness does it
(``python -m speft_bench task=mrpc method=speft metric=...``: ``run.seed_everything``, ``run.load_base``,
``run.calibration_sampler`` round 0), for each of grasp, synflow and fisher the global top-k mask of
``metric.variant=paper`` against that of ``metric.variant=reference`` (k = 331,776: LoRA r=8's count on
the 36 target linears), and for one metric the local mask with ``masking.local_split=proportional``
against ``equal``.  Both variants see the same calibration batches (GRaSP's reference draws a second
set after them: the same sampler, twice the examples, whose first half is checked to be the paper
variant's batches).  Jaccard = |A ∩ B| / |A ∪ B| over (layer, index) pairs.

    python scripts/compare_variants.py            # → results/bench/variant_jaccard.{json,md}

A measurement, not a test: about 30 minutes on one CPU core (GRaSP's double backward, 2 × 10 min, and
Fisher's 2 × 1024 per-example passes, 2 × 3.5 min, dominate).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import OUT, harness_config, machine  # noqa: E402  (scripts/ is not a package)

from speft_bench.masking import LOCAL_SPLITS, lora_param_count, select_mask  # noqa: E402
from speft_bench.methods.speft.method import budget  # noqa: E402
from speft_bench.models import targets_for  # noqa: E402
from speft_bench.run import calibration_sampler, load_base, seed_everything  # noqa: E402
from speft_bench.salience.base import calibration_sets, compute_salience  # noqa: E402

VARIANT_METRICS = ("grasp", "synflow", "fisher")


def jaccard(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|A ∩ B| / |A ∪ B| of two masks ({layer: sorted flat indices})."""
    both = sum(int(torch.isin(a[name], b[name]).sum()) for name in a)
    return both / (sum(len(a[n]) for n in a) + sum(len(b[n]) for n in b) - both)


def same_batches(first: list[dict], second: list[dict]) -> bool:
    return len(first) <= len(second) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(first, second))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", nargs="+", default=list(VARIANT_METRICS), choices=VARIANT_METRICS)
    parser.add_argument("--local-metric", default="gradient", help="metric whose local masks compare the two splits")
    parser.add_argument("--examples", type=int, default=1024, help="method.calibration_examples (the harness's 1024)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="variant_jaccard", help="results/bench/<name>.{json,md}")
    args = parser.parse_args()
    command = shlex.join(["python", "scripts/compare_variants.py", *sys.argv[1:]])
    torch.set_num_threads(args.threads)

    # task=mrpc, model=minilm_l6, method=speft at its defaults (lora_rank=8, 64 batches of 16), train.seed=0
    cfg, typed = harness_config("method=speft", "metric=gradient", f"method.calibration_examples={args.examples}")
    seed_everything(typed["train"])
    device = torch.device("cpu")
    _, _, _, data, model = load_base(typed, device)
    spec = typed["method"]
    sample = calibration_sampler(data.train, data.collate, typed["train"].seed, device)
    targets = targets_for(model, typed["model"], spec.targets)
    weights = {name: m.weight for name, m in targets.items()}
    shapes, k, _ = budget(targets, spec, typed["model"].name)
    assert k == lora_param_count(shapes, 8) == 331_776, k
    batches = {1: sample(0, spec.calibration_examples, spec.calibration_batch_size)}
    print(f"{len(weights)} targets, k = {k:,}, attention: {model.config._attn_implementation}", flush=True)

    def mask_of(metric: str, scope: str = "global", local_split: str = "proportional", **options):
        sets = calibration_sets(metric, **options)
        if sets not in batches:
            batches[sets] = sample(0, sets * spec.calibration_examples, spec.calibration_batch_size)
            assert same_batches(batches[1], batches[sets]), "the reference's first set must be the paper's batches"
        start = time.perf_counter()
        scores = compute_salience(metric, model, weights, batches[sets], **options)
        seconds = time.perf_counter() - start
        mask = select_mask(scores, k, scope, local_split)
        return mask, {"seconds": round(seconds, 1), "examples": sum(len(b["labels"]) for b in batches[sets])}

    rows = []
    for metric in args.metrics:
        paper, paper_cost = mask_of(metric, variant="paper")
        reference, reference_cost = mask_of(metric, variant="reference")
        rows.append({"compare": f"{metric}: metric.variant paper vs reference", "scope": "global",
                     "jaccard": jaccard(paper, reference), "paper": paper_cost, "reference": reference_cost})
        print(rows[-1], flush=True)
    proportional, cost = mask_of(args.local_metric, "local", "proportional")
    equal, _ = mask_of(args.local_metric, "local", "equal")
    rows.append({"compare": f"{args.local_metric}: masking.local_split proportional vs equal", "scope": "local",
                 "jaccard": jaccard(proportional, equal), "paper": cost,
                 "shares": {split: sorted(set(LOCAL_SPLITS[split](shapes, k).values()))
                            for split in LOCAL_SPLITS}})
    print(rows[-1], flush=True)

    lines = ["| masks compared (MiniLM-L6, MRPC, k = 331,776) | scope | Jaccard |", "|---|---|---:|"]
    lines += [f"| {row['compare']} | {row['scope']} | {row['jaccard']:.3f} |" for row in rows]
    note = (f"\n`{command}` on {machine()}; {args.threads} thread(s); {spec.calibration_examples} calibration "
            f"examples in batches of {spec.calibration_batch_size} (round 0 of the harness's sampler, seed "
            f"{typed['train'].seed}; GRaSP's reference: the next {spec.calibration_examples} too).\n")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.name}.json").write_text(json.dumps(
        {"command": command, "machine": machine(), "model": typed["model"].name, "task": typed["task"].name,
         "budget": k, "calibration_examples": spec.calibration_examples, "rows": rows}, indent=2))
    (OUT / f"{args.name}.md").write_text("\n".join(lines) + "\n" + note)
    print("\n".join(lines) + "\n" + note)


if __name__ == "__main__":
    main()
