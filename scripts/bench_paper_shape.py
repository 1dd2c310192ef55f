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
* ``mem_TTL``: peak memory over the training steps (forward, backward, AdamW step), at least two: only
  from the second on do AdamW's state and the gradients live beside the activations;
* ``mem = mem_TTL − mem_M``;
* ``parts`` of one step, exact tensor bytes: trainable tensors, their gradients, AdamW's state, and
  the activations autograd saves for backward (storages counted once, frozen weights left out);
* ``step_s``: median seconds of the timed steps (after one warm-up step).

Peak memory is RSS on CPU (``VmHWM`` reset by ``/proc/self/clear_refs`` once the model is built, with
``MALLOC_MMAP_THRESHOLD_`` so freed tensors go back to the OS) and ``max_memory_allocated`` on CUDA.
With several depths the report fits each memory figure to a + b·N by least squares, shows the
residuals and extrapolates to the model's full depth (labelled as an extrapolation).

``--ablate`` switches one thing off to show where memory goes: ``no_cache`` (``use_cache=False``: no
key/value cache in either pass) and ``sgd`` (plain SGD: no optimizer state); ``small_vocab`` cuts the
embedding and the LM head to 1,024 tokens, so that a step's time is its blocks' (Llama3-8B's 128k-token
head is most of a CPU step at one block, and its noise hides a block's).  With step times at several
depths the report fits them too: seconds per block, against LoRA's.  ``--salience METRIC …``
adds, per depth, the peak of that SPEFT salience metric on the same batch (the unadapted model,
``method.calibration_micro_batch=1``), to set against the SPEFT training peak.  Rows are appended to
``--out`` as they finish; a rerun skips the (model, precision, depth, variant, ablation) rows it holds.
One file holds one batch (B × T): a command with another is refused, since a file's rows are compared.
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
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import MMAP, OUT, attach_peft_only, harness_config, machine, reset_peak, rss_mb  # noqa: E402

FULL_DEPTH = {"llama2_7b": 32, "llama3_8b": 32}
SMALL_VOCAB = 1024  # --ablate small_vocab: rows of the embedding and the LM head
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
SALIENCE = "salience:"  # variant prefix of a salience row (--salience): the metric's pass, no method
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
        # a sparse tensor (SHiRA's delta) has no storage of its own: count its indices' and values'
        for part in (t._indices(), t._values()) if t.is_sparse else (t,):
            storage = part.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), precision.autocast(spec, device):
        loss = model(**batch).loss
    return loss, sum(seen.values())


def build(args):
    """(model, typed config, device): the shape cut to ``args.layers`` blocks, the variant attached."""
    from speft_bench import precision
    from speft_bench.device import resolve_device
    from speft_bench.methods.base import prepare_without_data
    from speft_bench.models import load_causal_lm, targets_for
    from speft_bench.schemas import TargetScope

    spec = VARIANTS.get(args.variant)  # None: floor, or a salience row (the unadapted model)
    overrides = spec if isinstance(spec, tuple) else ("method=lora",)
    cfg, typed = harness_config(f"model={args.model}", "model.init=random", f"model.num_layers={args.layers}",
                                "task=alpaca", f"train.precision={args.precision}", *overrides)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = load_causal_lm(typed["model"], None, precision.body_dtype(args.precision), str(device))
    if args.ablate == "small_vocab":
        model.resize_token_embeddings(SMALL_VOCAB)
    if isinstance(spec, tuple):
        model = prepare_without_data(model, cfg, typed).model  # the harness's method, data-free metrics
    elif spec == "peft":  # a peft-only variant on all seven linears
        model = attach_peft_only(model, args.variant, 64, targets_for(model, typed["model"], TargetScope.all))
    else:
        model.requires_grad_(False)
    if args.ablate == "no_cache":
        model.config.use_cache = False
    precision.setup(model, typed["train"])
    if args.variant != "full" and not args.variant.startswith(SALIENCE):
        model.enable_input_require_grads()  # the gradient flows through every block, as for any in-body method
    return model.train(), typed, device


def worker(args) -> dict:
    from speft_bench import precision

    torch.set_num_threads(args.threads)
    model, typed, device = build(args)
    spec = typed["train"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, min(30000, model.config.vocab_size), (args.batch_size, args.seq_len), generator=gen)
    ids = ids.to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    params = [p for p in model.parameters() if p.requires_grad]
    row = {"trainable": sum(p.numel() for p in params), "total": sum(p.numel() for p in model.parameters())}
    reset(device)
    with torch.no_grad(), precision.autocast(spec, device):
        model(**batch)
    row["mem_M_mb"] = peak_mb(device)
    reset(device)
    if args.variant.startswith(SALIENCE):
        return row | salience_peak(model, typed["model"], batch, args.variant.removeprefix(SALIENCE), device)
    optimizer = None if not params else (torch.optim.SGD(params, lr=1e-5) if args.ablate == "sgd"
                                         else torch.optim.AdamW(params, lr=1e-5))
    times = []
    for step in range(1 + max(args.steps, 1)):  # --steps 0: the second step is run, not timed
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
        if step > 0 and args.steps:
            times.append(time.perf_counter() - start)
    row["mem_TTL_mb"] = peak_mb(device)
    row["mem_mb"] = row["mem_TTL_mb"] - row["mem_M_mb"]
    row["trainable_mb"] = sum(p.numel() * p.element_size() for p in params) / 2**20
    row["optimizer_state_mb"] = 0.0 if optimizer is None else sum(
        t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0) / 2**20
    row["step_s"] = statistics.median(times) if times else None
    return row


def salience_peak(model, model_spec, batch, metric: str, device) -> dict:
    """mem_TTL of a salience row: the peak over one pass of ``metric`` on ``batch`` (targets: all seven linears).

    On CUDA the fp32 score buffers are kept on the host (``method.salience_offload=true``, what a GPU run sets
    for a 7–8B model), so the peak is the device's; on the CPU they are part of the peak either way."""
    from speft_bench.models import targets_for
    from speft_bench.salience.base import compute_salience
    from speft_bench.schemas import TargetScope

    weights = {n: m.weight for n, m in targets_for(model, model_spec, TargetScope.all).items()}
    offload = device.type == "cuda"
    start = time.perf_counter()
    scores = compute_salience(metric, model.eval(), weights, [batch], calibration_micro_batch=1, offload=offload)
    mem_ttl = peak_mb(device)
    return {"mem_TTL_mb": mem_ttl, "mem_mb": None, "step_s": round(time.perf_counter() - start, 1),
            "scores_mb": sum(t.numel() * t.element_size() for t in scores.values()) / 2**20,
            "salience_offload": offload}


def run_one(cli: list[str]) -> dict:
    """One configuration in a fresh process (its own peak memory); RuntimeError saying why if it fails."""
    done = subprocess.run([sys.executable, __file__, *cli], capture_output=True, text=True, env=os.environ | MMAP)
    if done.returncode < 0:  # SIGKILL here is the kernel's out-of-memory killer
        oom = " (out of memory)" if done.returncode == -9 else ""
        raise RuntimeError(f"killed by signal {-done.returncode}{oom}")
    if done.returncode:
        errors = [line for line in done.stderr.splitlines() if "Error" in line]  # not a progress bar's last line
        raise RuntimeError(errors[-1] if errors else f"exit code {done.returncode}")
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


def paper_cells(model: str, variant: str, ablate: str) -> tuple[str, str]:
    """Table 7's mem_TTL and mem beside a row of ours; none beside an ablation (the paper has none)."""
    if ablate != "none":
        return "—", "—"
    return paper_value(model, variant, "mem_TTL"), paper_value(model, variant, "mem")


KEY = ("model", "precision", "layers", "variant", "ablate")  # what makes a row; a rerun skips the rows it holds


def same(row: dict, **fields) -> bool:
    return "error" not in row and all(row.get(k, "none" if k == "ablate" else None) == v for k, v in fields.items())


def batches(rows: list[dict]) -> list[str]:
    """The batches (``BxT``) the rows were measured at; rows from before the field say none."""
    return sorted({r["batch"] for r in rows if "batch" in r})


def check_batch(rows: list[dict], batch: str, out: Path) -> None:
    """A file's rows are set against each other (ratios, fits), so they must share one batch (``BxT``)."""
    held = [b for b in batches(rows) if b != batch]
    if held:
        raise ValueError(f"--batch-size/--seq-len: {out} holds rows at batch {', '.join(held)} (B x T tokens), "
                         f"not {batch}; give this batch its own --out")


def gb(mb: float | None) -> str:
    return "—" if mb is None else f"{mb / 1024:.2f}"


def depth_fits(rows: list[dict]) -> dict:
    """(model, precision, variant, ablation) -> each memory figure's fit in GB over the depths measured (≥ 2),
    and the step time's in seconds where every depth was timed."""
    fits = {}
    for key in dict.fromkeys((r["model"], r["precision"], r["variant"], r.get("ablate", "none"))
                             for r in rows if "error" not in r):
        got = sorted((r for r in rows if same(r, model=key[0], precision=key[1], variant=key[2], ablate=key[3])),
                     key=lambda r: r["layers"])
        if len({r["layers"] for r in got}) >= 2:
            fits[key] = {m: fit([r["layers"] for r in got], [r[m] / (1024 if m.endswith("_mb") else 1) for r in got],
                                FULL_DEPTH[key[0]])
                         for m in ("mem_M_mb", "mem_TTL_mb", "mem_mb", "scores_mb", "step_s")
                         if all(r.get(m) is not None for r in got)}
            fits[key]["depths"] = [r["layers"] for r in got]
    return fits


def report(rows: list[dict]) -> str:
    lines = [f"Batch (B x T tokens): {', '.join(batches(rows)) or 'not recorded'}\n",
             "| model | precision | method | ablation | N | trainable | s/step | × LoRA s | mem_M GB | mem_TTL GB "
             "| mem GB | × LoRA mem | saved act. GB | grads GB | optimizer GB |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['model']} | {r['precision']} | {r['variant']} | {r.get('ablate', 'none')} | {r['layers']} "
        if "error" in r:
            lines.append(head + f"| error: {r['error']} | | | | | | | | | |")
            continue
        lora = next((x for x in rows if same(x, model=r["model"], precision=r["precision"], layers=r["layers"],
                                             variant="lora", ablate=r.get("ablate", "none"))), None)
        timed = lora and r["step_s"] and lora["step_s"] and not r["variant"].startswith(SALIENCE)
        ratio_s = f"{r['step_s'] / lora['step_s']:.2f}" if timed else "—"
        ratio_m = f"{r['mem_mb'] / lora['mem_mb']:.2f}" if lora and r["mem_mb"] is not None else "—"
        step = f"{r['step_s']:.2f}" if r["step_s"] else "—"
        lines.append(head + f"| {r['trainable']:,} | {step} | {ratio_s} | {gb(r['mem_M_mb'])} | {gb(r['mem_TTL_mb'])} "
                     f"| {gb(r['mem_mb'])} | {ratio_m} | {gb(r.get('saved_activations_mb'))} "
                     f"| {gb(r.get('gradients_mb'))} | {gb(r.get('optimizer_state_mb'))} |")
    out = "\n".join(lines) + "\n"
    fits = depth_fits(rows)
    if fits:
        out += ("\n**Extrapolated** to the full depth (32 blocks) by least squares a + b·N over the depths measured; "
                "residuals in GB; b = GB per block. × LoRA: against LoRA r=64 without dropout, same ablation; "
                "× paper LoRA: against LoRA r=64 with dropout 0.1, the paper's. Beside SPSFT Table 7 "
                "(fp32, its batch):\n\n"
                "| model | precision | method | ablation | N fitted | mem_M GB | mem_TTL GB (b) | mem GB (residuals) "
                "| × LoRA | × paper LoRA | paper mem_TTL | paper mem |\n"
                "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
        for (model, prec, variant, ablate), f in fits.items():
            ttl = f"{f['mem_TTL_mb']['extrapolated']:.2f} ({f['mem_TTL_mb']['b']:.3f})"
            if "mem_mb" not in f:  # a salience row: its peak only
                out += (f"| {model} | {prec} | {variant} | {ablate} | {', '.join(map(str, f['depths']))} "
                        f"| {f['mem_M_mb']['extrapolated']:.2f} | {ttl} | — | — | — | — | — |\n")
                continue
            ratios = []
            for ref in ("lora", "lora_dropout0.1"):
                other = fits.get((model, prec, ref, ablate), {}).get("mem_mb")
                ratios.append(f"{f['mem_mb']['extrapolated'] / other['extrapolated']:.2f}" if other else "—")
            res = ", ".join(f"{round(x, 3) + 0.0:+.3f}" for x in f["mem_mb"]["residuals"])  # no "-0.000"
            paper = paper_cells(model, variant, ablate)
            out += (f"| {model} | {prec} | {variant} | {ablate} | {', '.join(map(str, f['depths']))} "
                    f"| {f['mem_M_mb']['extrapolated']:.2f} | {ttl} | {f['mem_mb']['extrapolated']:.2f} ({res}) "
                    f"| {ratios[0]} | {ratios[1]} | {paper[0]} | {paper[1]} |\n")
    out += step_time_report(fits) + full_depth_report(rows) + salience_report(rows, fits)
    commands = dict.fromkeys((r["command"], r["machine"]) for r in rows if "command" in r)
    out += ("\nCommands (each row records its own; memory: peak RSS (VmHWM, MALLOC_MMAP_THRESHOLD_=131072) on CPU, "
            "max_memory_allocated on CUDA):\n\n" + "".join(f"- `{c}` on {m}\n" for c, m in commands))
    return out


def step_time_report(fits: dict) -> str:
    """Seconds per block (the slope b of the step time over the depths timed) against LoRA's, same ablation."""
    lines = []
    for (model, prec, variant, ablate), f in fits.items():
        if "step_s" not in f or variant.startswith(SALIENCE):
            continue
        lora = fits.get((model, prec, "lora", ablate), {}).get("step_s")
        res = ", ".join(f"{round(x, 2) + 0.0:+.2f}" for x in f["step_s"]["residuals"])  # no "-0.00"
        ratio = f"{f['step_s']['b'] / lora['b']:.2f}" if lora else "—"
        lines.append(f"| {model} | {prec} | {variant} | {ablate} | {', '.join(map(str, f['depths']))} "
                     f"| {f['step_s']['a']:.2f} | {f['step_s']['b']:.2f} ({res}) | {ratio} |")
    if not lines:
        return ""
    return ("\n**Step time per block**: least squares s/step = a + b·N over the depths timed (residuals in s); "
            "× LoRA: b against LoRA r=64's b, same ablation:\n\n"
            "| model | precision | method | ablation | N fitted | a s | b s/block (residuals) | × LoRA |\n"
            "|---|---|---|---|---|---:|---:|---:|\n" + "\n".join(lines) + "\n")


def full_depth_report(rows: list[dict]) -> str:
    """The rows measured at the model's full depth (a GPU node) beside SPSFT Table 7: no extrapolation."""
    lines = []
    for r in rows:
        if "error" in r or r["layers"] != FULL_DEPTH[r["model"]] or r["mem_mb"] is None:
            continue
        ablate, ratios = r.get("ablate", "none"), []
        for ref in ("lora", "lora_dropout0.1"):
            other = next((x for x in rows if same(x, model=r["model"], precision=r["precision"], layers=r["layers"],
                                                  variant=ref, ablate=ablate)), None)
            ratios.append(f"{r['mem_mb'] / other['mem_mb']:.2f}" if other else "—")
        paper = paper_cells(r["model"], r["variant"], ablate)
        lines.append(f"| {r['model']} | {r['precision']} | {r['variant']} | {ablate} | {gb(r['mem_M_mb'])} "
                     f"| {gb(r['mem_TTL_mb'])} | {gb(r['mem_mb'])} | {' | '.join(ratios)} | {' | '.join(paper)} |")
    if not lines:
        return ""
    return ("\n**Measured at the full depth** (32 blocks), beside SPSFT Table 7 (fp32, its batch); × LoRA and "
            "× paper LoRA as above:\n\n| model | precision | method | ablation | mem_M GB | mem_TTL GB | mem GB "
            "| × LoRA | × paper LoRA | paper mem_TTL | paper mem |\n"
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
            + "\n".join(lines) + "\n")


# fp32 (d_out, d_in) buffers a metric holds at its peak, in units of its scores (GraSP: E[g] and H·E[g])
SCORE_BUFFERS = {"grasp": 2}


def at_full_depth(rows: list[dict], fits: dict, key: tuple, field: str) -> tuple[float, str] | None:
    """``field`` (GB) of the (model, precision, variant, ablation) ``key`` at the model's full depth: measured
    there, else extrapolated over the depths measured; None when neither."""
    model, prec, variant, ablate = key
    full = next((r for r in rows if same(r, model=model, precision=prec, variant=variant, ablate=ablate,
                                         layers=FULL_DEPTH[model])), None)
    if full is not None:
        return full[field] / 1024, "measured"
    if field in fits.get(key, {}):
        return fits[key][field]["extrapolated"], "extrapolated"
    return None


def salience_report(rows: list[dict], fits: dict) -> str:
    """Each salience metric's peak against the SPEFT training peak of the same shape and precision, at the full
    depth (measured there, or both extrapolated).

    ``method.salience_offload=true`` keeps the fp32 score buffers on the host, so the device's peak is the
    peak less those buffers (their exact bytes, fitted over depth like the peaks). A row measured that way
    (CUDA) gives the device's peak, and the peak with the buffers on the device is derived by adding them.
    """
    lines = []
    for key in dict.fromkeys((r["model"], r["precision"], r["variant"], r.get("ablate", "none"))
                             for r in rows if "error" not in r and r["variant"].startswith(SALIENCE)):
        model, prec, variant, _ = key
        train = at_full_depth(rows, fits, (model, prec, "speft_sampled", "none"), "mem_TTL_mb")
        peak = at_full_depth(rows, fits, key, "mem_TTL_mb")
        if train is None or peak is None:
            continue
        metric = variant.removeprefix(SALIENCE)
        offloaded = any(r.get("salience_offload") for r in rows if same(r, model=model, precision=prec,
                                                                       variant=variant))
        buffers = SCORE_BUFFERS.get(metric, 1) * at_full_depth(rows, fits, key, "scores_mb")[0]
        with_buffers, without = (peak[0] + buffers, peak[0]) if offloaded else (peak[0], peak[0] - buffers)
        how = f"{peak[1]}, {'buffers offloaded' if offloaded else 'buffers on the device'}"
        lines.append(f"| {model} | {prec} | {metric} | {how} | {with_buffers:.2f} | {with_buffers / train[0]:.2f} "
                     f"| {buffers:.2f} | {without:.2f} | {without / train[0]:.2f} | {train[0]:.2f} ({train[1]}) |")
    if not lines:
        return ""
    return ("\nSalience peaks against the SPEFT training peak (speft_sampled, mem_TTL) at the full depth (32 blocks): "
            "measured there, or both **extrapolated**. *Without buffers*: the peak with the fp32 score buffers "
            "(GraSP: E[g] and H·E[g]) on the host, as `method.salience_offload=true` keeps them, i.e. the device's "
            "peak on a GPU; the one of the two peaks that was not measured is derived from the buffers' bytes:\n\n"
            "| model | precision | metric | peak | peak GB | × SPEFT training | score buffers GB "
            "| peak without buffers GB | × SPEFT training | SPEFT training peak GB |\n"
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(FULL_DEPTH), choices=list(FULL_DEPTH))
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4], help="depths N (model.num_layers)")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "bf16-mixed"])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--ablate", nargs="+", default=["none"], choices=["none", "no_cache", "sgd", "small_vocab"],
                        help="switch one thing off: the key/value cache, AdamW's state (plain SGD), or all but "
                             f"{SMALL_VOCAB} rows of the embedding and LM head (a step's time is its blocks')")
    parser.add_argument("--salience", nargs="*", default=[], metavar="METRIC",
                        help="also the peak of these SPEFT salience metrics on the same batch")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=1,
                        help="timed steps after a warm-up step (0: memory only, over 2 untimed steps)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=OUT / "paper_shape.json",
                        help="JSON, appended to and resumed from; the table goes beside it (.md)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one configuration: its KEY, comma-separated
    args = parser.parse_args()
    argv = [a for a in sys.argv[1:] if not a.startswith("--worker")]
    if args.worker:
        args.model, args.precision, layers, args.variant, args.ablate = args.worker.split(",")  # KEY order
        args.layers = int(layers)
        print(json.dumps(worker(args)))
        return
    if args.salience:
        from speft_bench.salience import SALIENCE_METRICS

        unknown = [m for m in args.salience if m not in SALIENCE_METRICS]
        if unknown:
            parser.error(f"--salience: {', '.join(unknown)} not known; allowed: {', '.join(SALIENCE_METRICS.names())}")
    rows = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    batch = f"{args.batch_size}x{args.seq_len}"
    try:
        check_batch(rows, batch, args.out)
    except ValueError as err:
        parser.error(str(err))
    command = "python scripts/bench_paper_shape.py " + " ".join(argv)
    jobs = [(model, prec, layers, variant, ablate) for model in args.models for prec in args.precisions
            for layers in args.layers
            for variant, ablate in [(v, a) for v in args.variants for a in args.ablate]
            + [(SALIENCE + m, "none") for m in args.salience]]
    for job in tqdm(jobs, desc="configurations", unit="run"):
        key = dict(zip(KEY, job))
        if any(all(r.get(k, "none") == v for k, v in key.items()) for r in rows):
            continue  # measured by an earlier command into this file
        cli = [*argv, "--worker", ",".join(map(str, job))]
        try:
            row = run_one(cli)
        except RuntimeError as err:  # e.g. out of memory: the row says so, the others still run
            row = {"error": str(err)[:120]}
        rows.append(key | row | {"command": command, "machine": machine(), "threads": args.threads,
                                 "steps": args.steps, "batch": batch})
        tqdm.write(json.dumps(rows[-1]))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # after every row, atomically: a killed bench keeps what it measured
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"rows": rows}, indent=2))
        tmp.replace(args.out)
        args.out.with_suffix(".md").write_text(report(rows))
    print(report(rows))


if __name__ == "__main__":
    main()
