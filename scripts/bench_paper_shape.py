"""Paper-shape benchmark: SPSFT Table 7's memory and SPEFT's speed claim on Llama2-7B / Llama3-8B shapes.

    python scripts/bench_paper_shape.py --layers 1 2 4                      # CPU: truncated depths, fit a + b·N
    python scripts/bench_paper_shape.py --layers 32 --precisions fp32 bf16  # a GPU node: full depth

Each configuration (model shape, depth N, precision, method) runs in a fresh process: the architecture
with random weights cut to N blocks (``model.init=random model.num_layers=N``), the method attached by
the harness itself (``METHODS[name].prepare``; SPEFT and SPSFT with data-free metrics, since which
entries train changes neither time nor memory), one batch of B × T random token ids (causal-LM loss on
every token), AdamW, and the run's precision (``speft_bench.precision``).  It reports, after the SPSFT
paper's appendix D.1:

* ``mem_M``: peak memory of a no-grad forward of the batch (inference on the training data);
* ``mem_TTL``: peak memory over the training steps (forward, backward, AdamW step);
* ``mem = mem_TTL − mem_M``;
* ``parts`` of one step, exact tensor bytes: trainable tensors, their gradients, AdamW's state, and
  the activations autograd saves for backward (storages counted once, frozen weights left out);
* ``step_s``: median seconds of the timed steps (after one warm-up step).

Peak memory is RSS on CPU (``VmHWM`` reset by ``/proc/self/clear_refs`` once the model is built, with
``MALLOC_MMAP_THRESHOLD_`` so freed tensors go back to the OS) and ``max_memory_allocated`` on CUDA.
With several depths the report fits each memory figure to a + b·N by least squares, shows the
residuals and extrapolates to the model's full depth (labelled as an extrapolation).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import MMAP, OUT, attach_peft_only, harness_config, machine, reset_peak, rss_mb  # noqa: E402

FULL_DEPTH = {"llama2_7b": 32, "llama3_8b": 32}
# variant -> harness overrides (the budget: LoRA r = 64 on all seven linears, SPSFT r = 128 = 2R, as Table 7),
# or "peft": bench.PEFT_ONLY's variant at rank 64 (Super-Tuning and SHiRA match LoRA r = 64's count on the same linears)
LORA64 = ("method.r=64", "method.alpha=16", "method.dropout=0.0")
VARIANTS = {
    "floor": None,  # no method: the frozen body's forward + backward (input embeddings require grad)
    "lora": ("method=lora", *LORA64),
    "lora_dropout0.1": ("method=lora", "method.r=64", "method.alpha=16", "method.dropout=0.1"),  # the paper's
    "dora": ("method=dora", *LORA64),
    "pissa": ("method=pissa", *LORA64),
    "speft_sampled": ("method=speft", "metric=magnitude", "method.lora_rank=64", "method.value_grad=sampled"),
    "speft_dense": ("method=speft", "metric=magnitude", "method.lora_rank=64", "method.value_grad=dense"),
    "spsft": ("method=spsft", "metric=l2", "method.r=128"),
    "fa_lora": ("method=lora", *LORA64, "method.targets=mlp"),
    "fa_spsft": ("method=spsft", "metric=l2", "method.r=128", "method.targets=mlp"),
    "supertuning": "peft",
    "shira": "peft",
    "full": ("method=full",),
}
PAPER = Path(__file__).resolve().parent.parent / "results" / "paper" / "spsft_table7.csv"
# lora_dropout0.1: the paper's LoRA uses dropout 0.1
PAPER_ROWS = {"lora_dropout0.1": "LoRA, r = 64", "dora": "DoRA, r = 64", "spsft": "SPSFT, r = 128",
              "fa_lora": "FA-LoRA, r = 64", "fa_spsft": "FA-SPSFT, r = 128"}
PAPER_MODELS = {"llama2_7b": "Llama2(7B)", "llama3_8b": "Llama3(8B)"}


# --------------------------------------------------------------------------- one configuration (worker)
def peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss_mb("VmHWM")


def reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak()


def saved_activation_bytes(model, batch, spec, device) -> tuple[float, int]:
    """(loss, bytes of the tensors autograd saves in one forward), storages once, parameters left out."""
    from speft_bench import precision

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), precision.autocast(spec, device):
        loss = model(**batch).loss
    return loss, sum(seen.values())


def build(args):
    """(model, typed train spec, device): the shape cut to ``args.layers`` blocks, the variant attached."""
    from speft_bench import precision
    from speft_bench.device import resolve_device
    from speft_bench.methods.base import prepare_without_data
    from speft_bench.models import load_causal_lm, targets_for
    from speft_bench.schemas import TargetScope

    spec = VARIANTS[args.variant]
    overrides = spec if isinstance(spec, tuple) else ("method=lora",)
    cfg, typed = harness_config(f"model={args.model}", "model.init=random", f"model.num_layers={args.layers}",
                                "task=alpaca", f"train.precision={args.precision}", *overrides)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = load_causal_lm(typed["model"], None, precision.body_dtype(args.precision), str(device))
    if isinstance(spec, tuple):
        model = prepare_without_data(model, cfg, typed).model  # the harness's method, data-free metrics
    elif spec == "peft":  # a peft-only variant on all seven linears
        model = attach_peft_only(model, args.variant, 64, targets_for(model, typed["model"], TargetScope.all))
    else:
        model.requires_grad_(False)
    precision.setup(model, typed["train"])
    if args.variant != "full":
        model.enable_input_require_grads()  # the gradient flows through every block, as for any in-body method
    return model.train(), typed["train"], device


def worker(args) -> dict:
    from speft_bench import precision

    torch.set_num_threads(args.threads)
    model, spec, device = build(args)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 30000, (args.batch_size, args.seq_len), generator=gen).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    params = [p for p in model.parameters() if p.requires_grad]
    row = {"trainable": sum(p.numel() for p in params), "total": sum(p.numel() for p in model.parameters())}
    reset(device)
    with torch.no_grad(), precision.autocast(spec, device):
        model(**batch)
    row["mem_M_mb"] = peak_mb(device)
    reset(device)
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None
    times = []
    for step in range(1 + args.steps):
        start = time.perf_counter()
        if step == 0:
            loss, row["saved_activations_mb"] = saved_activation_bytes(model, batch, spec, device)
            row["saved_activations_mb"] /= 2**20
        else:
            with precision.autocast(spec, device):
                loss = model(**batch).loss
        loss.backward()
        if step == 0:
            row["gradients_mb"] = sum(p.grad.numel() * p.grad.element_size()
                                      for p in params if p.grad is not None) / 2**20
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step > 0:
            times.append(time.perf_counter() - start)
    row["mem_TTL_mb"] = peak_mb(device)
    row["mem_mb"] = row["mem_TTL_mb"] - row["mem_M_mb"]
    row["trainable_mb"] = sum(p.numel() * p.element_size() for p in params) / 2**20
    row["optimizer_state_mb"] = 0.0 if optimizer is None else sum(
        t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0) / 2**20
    row["step_s"] = statistics.median(times) if times else None
    return row


def run_one(cli: list[str]) -> dict:
    """One configuration in a fresh process (its own peak memory); RuntimeError with its stderr's end if it fails."""
    done = subprocess.run([sys.executable, __file__, *cli], capture_output=True, text=True, env=os.environ | MMAP)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:] or f"exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- fit and report
def fit(depths: list[int], values: list[float], full: int) -> dict:
    """Least squares value = a + b·N; the residuals and the extrapolation to ``full`` blocks."""
    b, a = np.polyfit(depths, values, 1)
    residuals = [v - (a + b * n) for n, v in zip(depths, values)]
    return {"a": a, "b": b, "residuals": residuals, "extrapolated": a + b * full}


def paper_value(model: str, variant: str, column: str) -> str:
    import pandas as pd

    if variant not in PAPER_ROWS or model not in PAPER_MODELS:
        return "—"
    table = pd.read_csv(PAPER)
    hit = table[(table.model == PAPER_MODELS[model]) & (table.row == PAPER_ROWS[variant]) & (table.column == column)]
    if hit.empty:
        return "—"
    prefix = ">" if "lower bound" in hit.unit.iloc[0] else ""
    return f"{prefix}{hit.value.iloc[0]:g}"


def report(rows: list[dict], args) -> str:
    gb = 1 / 1024
    lines = ["| model | precision | method | N | trainable | s/step | × LoRA s | mem_M GB | mem_TTL GB | mem GB "
             "| × LoRA mem | saved act. GB | grads GB | AdamW GB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['precision']} | {r['variant']} | {r['layers']} | {r['error']} "
                         f"| | | | | | | | | |")
            continue
        lora = next((x for x in rows if x.get("variant") == "lora" and "error" not in x
                     and (x["model"], x["precision"], x["layers"]) == (r["model"], r["precision"], r["layers"])), None)
        ratio_s = f"{r['step_s'] / lora['step_s']:.2f}" if lora and r["step_s"] and lora["step_s"] else "—"
        ratio_m = f"{r['mem_mb'] / lora['mem_mb']:.2f}" if lora and lora["mem_mb"] > 0 else "—"
        step = f"{r['step_s']:.2f}" if r["step_s"] else "—"
        lines.append(f"| {r['model']} | {r['precision']} | {r['variant']} | {r['layers']} | {r['trainable']:,} "
                     f"| {step} | {ratio_s} | {r['mem_M_mb'] * gb:.2f} | {r['mem_TTL_mb'] * gb:.2f} "
                     f"| {r['mem_mb'] * gb:.2f} | {ratio_m} | {r['saved_activations_mb'] * gb:.2f} "
                     f"| {r['gradients_mb'] * gb:.2f} | {r['optimizer_state_mb'] * gb:.2f} |")
    out = "\n".join(lines) + "\n"
    depths = sorted({r["layers"] for r in rows})
    if len(depths) >= 2:
        out += ("\nExtrapolation to the full depth (least squares a + b·N over N = "
                f"{', '.join(map(str, depths))}; residuals in GB) beside SPSFT Table 7 (fp32, its batch):\n\n"
                "| model | precision | method | mem_M GB | mem_TTL GB | mem GB (residuals) | × LoRA | paper mem_TTL "
                "| paper mem |\n|---|---|---|---:|---:|---:|---:|---:|---:|\n")
        fits = {}
        for key in sorted({(r["model"], r["precision"], r["variant"]) for r in rows if "error" not in r},
                          key=lambda k: (k[0], k[1], list(VARIANTS).index(k[2]))):
            got = sorted((r for r in rows if (r["model"], r["precision"], r["variant"]) == key and "error" not in r),
                         key=lambda r: r["layers"])
            if len(got) < 2:
                continue
            ns = [r["layers"] for r in got]
            fits[key] = {m: fit(ns, [r[m] * gb for r in got], FULL_DEPTH[key[0]])
                         for m in ("mem_M_mb", "mem_TTL_mb", "mem_mb")}
        for (model, prec, variant), f in fits.items():
            lora = fits.get((model, prec, "lora"))
            ratio = f"{f['mem_mb']['extrapolated'] / lora['mem_mb']['extrapolated']:.2f}" if lora else "—"
            res = ", ".join(f"{x:+.3f}" for x in f["mem_mb"]["residuals"])
            lines_ = (f"| {model} | {prec} | {variant} | {f['mem_M_mb']['extrapolated']:.2f} "
                      f"| {f['mem_TTL_mb']['extrapolated']:.2f} | {f['mem_mb']['extrapolated']:.2f} ({res}) | {ratio} "
                      f"| {paper_value(model, variant, 'mem_TTL')} | {paper_value(model, variant, 'mem')} |\n")
            out += lines_
    memory = ("max_memory_allocated" if args.device.startswith("cuda")
              else "peak RSS (VmHWM, MALLOC_MMAP_THRESHOLD_=131072)")
    out += (f"\n`python scripts/bench_paper_shape.py {' '.join(args.argv)}` on {machine()}; batch "
            f"{args.batch_size}×{args.seq_len}; {args.threads} threads; {args.steps} timed step(s) after one warm-up; "
            f"memory: {memory}.\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(FULL_DEPTH), choices=list(FULL_DEPTH))
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4], help="depths N (model.num_layers)")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "bf16-mixed"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=OUT / "paper_shape.json",
                        help="JSON; the table goes beside it (.md)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # model,layers,precision,variant: one configuration
    args = parser.parse_args()
    args.argv = [a for a in sys.argv[1:] if not a.startswith("--worker")]
    if args.worker:
        args.model, layers, args.precision, args.variant = args.worker.split(",")
        args.layers = int(layers)
        print(json.dumps(worker(args)))
        return
    rows = []
    for model in args.models:
        for prec in args.precisions:
            for layers in args.layers:
                for variant in args.variants:
                    key = {"model": model, "precision": prec, "layers": layers, "variant": variant}
                    cli = [*args.argv, "--worker", f"{model},{layers},{prec},{variant}"]
                    try:
                        rows.append(key | run_one(cli))
                    except RuntimeError as err:  # e.g. out of memory: the row says so, the others still run
                        rows.append(key | {"error": str(err).strip().splitlines()[-1][:120]})
                    print(json.dumps(rows[-1]), flush=True)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    data = {"machine": machine(),
                            "command": "python scripts/bench_paper_shape.py " + " ".join(args.argv),
                            "rows": rows}
                    args.out.write_text(json.dumps(data, indent=2))  # after every row: a killed bench keeps its rows
                    args.out.with_suffix(".md").write_text(report(rows, args))
    print(report(rows, args))


if __name__ == "__main__":
    main()
