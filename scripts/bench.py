"""Benchmarks: step time and training memory per fine-tuning method, salience cost, value-gradient kernels.

    python scripts/bench.py steps      # methods side by side (MiniLM-L6 16×128, SmolLM2-135M 16×128)
    python scripts/bench.py salience   # each SPEFT metric on 1024 real MRPC examples (MiniLM-L6)
    python scripts/bench.py kernels    # SPEFT's two value-gradient kernels alone, per layer shape and dtype

`make bench` runs all three; results go to results/bench/*.json and *.md (BENCHMARKS.md quotes them).

How `steps` measures, per (model, method) configuration, each in a fresh process of its own:
* time: median seconds of a forward + backward + AdamW step, ``--rounds`` rounds of ``--steps``
  steps after 2 warm-up steps, with ``--threads`` torch threads;
* memory: peak RSS in a second process run with ``MALLOC_MMAP_THRESHOLD_=131072``, so that glibc returns
  every freed tensor above 128 KiB to the OS and RSS follows live tensors (without it freed memory is
  kept and LoRA showed the RSS of full fine-tuning).  The peak is reset (``/proc/self/clear_refs``)
  after the model is built, then taken over (i) one no-grad forward, ``inference`` = mem_M, and
  (ii) warm-up + timed training steps, ``train`` = mem_TTL.  ``train − inference`` is the SPSFT paper's
  training memory (appendix D.1); ``train − floor's train`` is what a method adds to the physical floor.
Every method trains at the same budget: LoRA's trainable count at rank r on the same linears.
LoRA, PiSSA, DoRA, SPEFT, SPSFT and Full are the runs' own methods, built by
``speft_bench.methods.METHODS`` from a composed harness config (``HARNESS``: the overrides);
Super-Tuning and SHiRA exist only in peft and are attached here (``PEFT_ONLY``).  The ``floor`` is
no adapter: forward + backward through the frozen body (input embeddings require grad, so the
gradient flows through every layer) — what any method that trains inside the body pays.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "bench"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(OFFLINE)
MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # freed tensors > 128 KiB go back to the OS: RSS follows live tensors


# --------------------------------------------------------------------------- models and variants
def harness_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    from speft_bench.config import register_schemas, validate

    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["task=mrpc", "method=lora", *overrides])
    return cfg, validate(cfg)


def load(model_name: str, *overrides: str) -> tuple[nn.Module, object, bool]:
    """(model, model schema, is_classifier): encoders as MRPC classifiers, decoders as causal LMs."""
    _, typed = harness_config(f"model={model_name}", *overrides)
    return load_typed(typed)


def load_typed(typed: dict) -> tuple[nn.Module, object, bool]:
    """The model of a validated harness config (``harness_config``'s second value), as ``load``."""
    from transformers.utils import logging

    from speft_bench.models import load_causal_lm, load_model, load_tokenizer, resolve_pretrained
    from speft_bench.schemas import Family

    logging.set_verbosity_error()
    spec, cache = typed["model"], typed["paths"].cache_dir
    torch.manual_seed(0)
    source = resolve_pretrained(spec, cache)
    if spec.family is Family.encoder:
        return load_model(spec, typed["task"], source, load_tokenizer(source, spec), torch.float32), spec, True
    return load_causal_lm(spec, source, torch.float32), spec, False


def supertuning(r: int) -> Callable:
    """peft's Super-Tuning at one sparsity for all layers, matching LoRA-r's total count."""
    def build(model, targets, spec):
        from peft import SupertuningConfig, inject_adapter_in_model

        count = sum(r * sum(m.weight.shape) for m in targets.values())
        density = count / sum(m.weight.numel() for m in targets.values())
        return inject_adapter_in_model(SupertuningConfig(sparsity=1 - density, target_modules=list(targets)), model)
    return build


def shira(r: int) -> Callable:
    def build(model, targets, spec):
        from peft import ShiraConfig, inject_adapter_in_model

        return inject_adapter_in_model(ShiraConfig(r=r, random_seed=0, target_modules=list(targets)), model)
    return build


# peft-only variants, which the harness does not offer: name -> (builder at rank r, the parameters it trains)
PEFT_ONLY: dict[str, tuple[Callable[[int], Callable], Callable[[str], bool]]] = {
    "supertuning": (supertuning, lambda n: "supertuning_" in n or n.endswith("values")),
    "shira": (shira, lambda n: "shira_" in n),
}


def attach_peft_only(model: nn.Module, variant: str, r: int, targets: dict, keep: frozenset = frozenset()) -> nn.Module:
    """A ``PEFT_ONLY`` variant at rank ``r`` on ``targets``: only its parameters (and those named in ``keep``) train."""
    builder, trains = PEFT_ONLY[variant]
    model.requires_grad_(False)
    model = builder(r)(model, targets, None)
    for name, p in model.named_parameters():
        p.requires_grad_(trains(name) or name in keep)
    return model


def harness_variant(variant: str, r: int, scope: str) -> tuple[str, ...]:
    """The harness overrides of a ``HARNESS`` variant at rank ``r`` (SPSFT's ``r`` is its rows, already 2R)
    on the ``scope`` linears: LoRA-r's trainable count, as every method of ``steps``."""
    return (*HARNESS[variant](r), *(() if variant == "full" else (f"method.targets={scope}",)))


# Built by the harness (speft_bench.methods.METHODS) from these overrides at rank r: LoRA/PiSSA/DoRA r with
# alpha 2r and no dropout; SPEFT at lora_rank=r, magnitude entries ranked per layer, each layer its
# size's share of k (static_local, proportional: data-free, every layer the same density); SPSFT's r
# rows per layer by ℓ2 (data-free).  Full: every parameter.  The head trains densely in all of them.
HARNESS: dict[str, Callable[[int], tuple[str, ...]]] = {
    "lora": lambda r: ("method=lora", f"method.r={r}", f"method.alpha={2 * r}", "method.dropout=0.0"),
    "pissa": lambda r: ("method=pissa", f"method.r={r}", f"method.alpha={2 * r}", "method.dropout=0.0"),
    "dora": lambda r: ("method=dora", f"method.r={r}", f"method.alpha={2 * r}", "method.dropout=0.0"),
    "speft": lambda r: ("method=speft", "metric=magnitude", "masking=static_local", f"method.lora_rank={r}"),
    "spsft": lambda r: ("method=spsft", "metric=l2", f"method.r={r}"),
    "full": lambda r: ("method=full",),
}
# floor: no method — forward + backward through the frozen body; only a classifier's head trains
VARIANTS = ["floor", *HARNESS, *PEFT_ONLY]


def build(model_name: str, variant: str, r: int, scope: str):
    """The model with ``variant`` applied on the ``scope`` targets, and only its parameters trainable."""
    from speft_bench.methods.base import prepare_without_data
    from speft_bench.models import head_parameters, targets_for
    from speft_bench.schemas import TargetScope

    overrides = harness_variant(variant, r, scope) if variant in HARNESS else ()
    cfg, typed = harness_config(f"model={model_name}", *overrides)
    model, spec, classifier = load_typed(typed)
    head = frozenset(head_parameters(model)) if classifier else frozenset()
    if variant in HARNESS:
        model = prepare_without_data(model, cfg, typed).model
    elif variant in PEFT_ONLY:
        model = attach_peft_only(model, variant, r, targets_for(model, spec, TargetScope[scope]), head)
    else:  # floor
        for name, p in model.named_parameters():
            p.requires_grad_(name in head)
    model.enable_input_require_grads()  # the gradient flows through every layer, as for any in-body method
    return model.train(), classifier


def make_batch(classifier: bool, batch_size: int, seq_len: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch_size, seq_len), generator=gen)
    labels = torch.randint(0, 2, (batch_size,), generator=gen) if classifier else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


# --------------------------------------------------------------------------- one configuration (worker)
def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    model, classifier = build(args.model, args.variant, args.r, args.scope)
    batch = make_batch(classifier, args.batch_size, args.seq_len)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None
    result = {"trainable": sum(p.numel() for p in params)}
    reset_peak()
    base = rss_mb("VmRSS")
    with torch.no_grad():
        model(**batch)
    result["inference_mb"] = rss_mb("VmHWM") - base
    reset_peak()
    times = []
    for i in range(2 + args.rounds * args.steps):
        start = time.perf_counter()
        model(**batch).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - start)
    result["train_mb"] = rss_mb("VmHWM") - base
    rounds = [statistics.median(times[i * args.steps:(i + 1) * args.steps]) for i in range(args.rounds)]
    return result | {"round_medians_s": rounds, "step_s": statistics.median(times)}


def run_worker(cli: list[str], env: dict | None = None, command: str = "_worker") -> dict:
    done = subprocess.run([sys.executable, __file__, command, *cli], capture_output=True, text=True,
                          env=os.environ | (env or {}), cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"worker {cli} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- reports
def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def save(name: str, data: dict, table: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=2))
    (OUT / f"{name}.md").write_text(table)
    print(table)


def steps(args) -> None:
    rows, lines = [], []
    variants = ["floor"] + [v for v in args.variants if v != "floor"]  # every row is compared with the floor
    for model_name, batch_size, seq_len in args.models:
        for scope in args.scopes:
            for variant in variants:
                r = 2 * args.r if variant == "spsft" else args.r  # SPSFT r=2R is LoRA r=R's count (paper)
                cli = ["--model", model_name, "--variant", variant, "--r", str(r), "--scope", scope,
                       "--batch-size", str(batch_size), "--seq-len", str(seq_len), "--threads", str(args.threads),
                       "--steps", str(args.steps), "--rounds", str(args.rounds)]
                mem = run_worker(cli if args.single_pass else cli[:-4] + ["--steps", "2", "--rounds", "1"], MMAP)
                timed = mem if args.single_pass else run_worker(cli)
                row = {"model": model_name, "batch": f"{batch_size}×{seq_len}", "scope": scope, "variant": variant,
                       "r": r, "trainable": timed["trainable"], "step_s": timed["step_s"],
                       "round_medians_s": timed["round_medians_s"], "inference_mb": mem["inference_mb"],
                       "train_mb": mem["train_mb"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    header = ("| model | batch | targets | method | trainable | s/step | × floor | × LoRA | train MB (mem_TTL) "
              "| − inference (paper D.1) | − floor |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ref = {x["variant"]: x for x in rows if (x["model"], x["scope"]) == (row["model"], row["scope"])}
        fl, lo = ref["floor"], ref.get("lora")
        vs_lora = f"{row['step_s'] / lo['step_s']:.2f}" if lo else "—"
        lines.append(f"| {row['model']} | {row['batch']} | {row['scope']} | {row['variant']} (r={row['r']}) "
                     f"| {row['trainable']:,} | {row['step_s']:.3f} | {row['step_s'] / fl['step_s']:.2f} | {vs_lora} "
                     f"| {row['train_mb']:.0f} | {row['train_mb'] - row['inference_mb']:.0f} "
                     f"| {row['train_mb'] - fl['train_mb']:.0f} |")
    timing = "in the memory process" if args.single_pass else "in a separate process"
    note = (f"\n`python scripts/bench.py steps {' '.join(args.argv)}` on {machine()}; {args.threads} threads, "
            f"median of {args.rounds}×{args.steps} steps ({timing}); "
            f"memory: peak RSS with MALLOC_MMAP_THRESHOLD_=131072.\n")
    save(args.name, {"machine": machine(), "args": args.argv, "rows": rows},
         header + "\n" + "\n".join(lines) + "\n" + note)


def salience(args) -> None:
    """Seconds per metric on the calibration set the harness uses (1024 real MRPC examples, 64×16), and
    what the figures need: score histograms, the LoRA-r=8-budget global masks' per-layer density and
    their pairwise Jaccard overlap."""
    from transformers import DataCollatorWithPadding

    from speft_bench.data.glue import TokenizedSplit, load_glue
    from speft_bench.masking import density_per_layer, lora_param_count, top_k
    from speft_bench.models import load_model, load_tokenizer, resolve_pretrained, targets_for
    from speft_bench.run import calibration_sampler
    from speft_bench.salience import SALIENCE_METRICS
    from speft_bench.salience.base import compute_salience
    from speft_bench.schemas import TargetScope

    torch.set_num_threads(args.threads)
    cfg, typed = harness_config("model=minilm_l6")
    source = resolve_pretrained(typed["model"], typed["paths"].cache_dir)
    tokenizer = load_tokenizer(source, typed["model"])
    model = load_model(typed["model"], typed["task"], source, tokenizer, torch.float32)
    train = TokenizedSplit(load_glue(typed["task"], typed["paths"].data_root)["train"], tokenizer,
                           typed["task"].max_length)
    batches = calibration_sampler(train, DataCollatorWithPadding(tokenizer), 0,
                                  torch.device("cpu"))(0, args.examples, 16)
    weights = {n: m.weight for n, m in targets_for(model, typed["model"], TargetScope.all).items()}
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    k = lora_param_count(shapes, 8)
    seconds, histograms, masks = {}, {}, {}
    edges = torch.linspace(-16, 2, 73, dtype=torch.float64)  # log10 |score| bins
    for metric in SALIENCE_METRICS.names():
        start = time.perf_counter()
        scores = compute_salience(metric, model, weights, batches)
        seconds[metric] = time.perf_counter() - start
        flat = torch.cat([s.reshape(-1).double() for s in scores.values()])
        logs = flat.abs().clamp_min(1e-16).log10().clamp(-16, 2)
        histograms[metric] = {"counts": torch.histogram(logs, edges).hist.tolist(),
                              "negative_fraction": float((flat < 0).double().mean())}
        masks[metric] = {n: set(idx.tolist()) for n, idx in top_k(scores, k).items()}
        print(f"{metric}: {seconds[metric]:.1f} s", flush=True)
    jaccard = {a: {b: sum(len(masks[a][n] & masks[b][n]) for n in shapes) /
                      sum(len(masks[a][n] | masks[b][n]) for n in shapes) for b in masks} for a in masks}
    density = {m: density_per_layer({n: list(v) for n, v in mask.items()}, shapes) for m, mask in masks.items()}
    lines = ["| metric | seconds for 1024 MRPC examples |", "|---|---:|"]
    lines += [f"| {m} | {s:.1f} |" for m, s in seconds.items()]
    note = (f"\n`python scripts/bench.py salience` on {machine()}; {args.threads} threads; "
            "MiniLM-L6, 36 target linears.\n")
    save("salience", {"machine": machine(), "examples": args.examples, "budget": k, "seconds": seconds,
                      "histogram_edges_log10": edges.tolist(), "histograms": histograms, "jaccard": jaccard,
                      "density_per_layer": density}, "\n".join(lines) + "\n" + note)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kernels(args) -> None:
    """Value-gradient kernels alone (ms, best of ``--repeats``) per layer shape, density and dtype of g and x,
    with the cost model's pick; densities: LoRA-r-matched (r·(d_out + d_in) entries) and ``--densities``."""
    from speft_bench.methods.speft.layer import choose_value_grad, dense_value_grad, sampled_value_grad

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    lines = ["| d_out×d_in | density | dtype | dense ms | sampled ms | faster | pick |",
             "|---|---:|---|---:|---:|---|---|"]
    for d_out, d_in in args.shapes:
        for density in [args.lora_rank * (d_out + d_in) / (d_out * d_in), *args.densities]:
            k = int(density * d_out * d_in)
            indices = torch.randperm(d_out * d_in, generator=gen)[:k].sort().values.int()
            for dtype_name in args.dtypes:
                dtype = DTYPES[dtype_name]
                x = torch.randn(args.tokens, d_in, generator=gen).to(dtype)
                g = torch.randn(args.tokens, d_out, generator=gen).to(dtype)
                ms = {}
                for name, kernel in [("dense", dense_value_grad), ("sampled", sampled_value_grad)]:
                    best = float("inf")
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        kernel(g, x, indices)
                        best = min(best, time.perf_counter() - start)
                    ms[name] = best * 1e3
                pick = choose_value_grad(d_out, d_in, k, dtype)
                rows.append({"d_out": d_out, "d_in": d_in, "k": k, "density": density, "dtype": dtype_name, **ms,
                             "pick": pick})
                lines.append(f"| {d_out}×{d_in} | {density:.3f} | {dtype_name} | {ms['dense']:.1f} "
                             f"| {ms['sampled']:.1f} | {min(ms, key=ms.get)} | {pick} |")
                print(lines[-1], flush=True)
    note = (f"\n`python scripts/bench.py kernels {' '.join(args.argv)}` on {machine()}; {args.threads} threads; "
            f"{args.tokens} tokens; best of {args.repeats}.\n")
    save(args.name, {"machine": machine(), "args": args.argv, "rows": rows}, "\n".join(lines) + "\n" + note)


def eval_memory(args) -> None:
    """lm-eval's peak memory and wall time per eval batch size, each in a fresh process."""
    rows = [run_worker(["--model", args.model, "--batch-size", str(b), "--limit", str(args.limit),
                        "--threads", str(args.threads)], MMAP, "_eval_worker") | {"batch_size": b}
            for b in args.batch_sizes]
    lines = [f"# lm-eval memory: {args.model}, MMLU 5-shot, {args.limit} question(s) per subject "
             f"({machine()})", "", "| eval batch | peak RSS above the loaded model (MB) | wall (s) | acc |",
             "|---|---|---|---|"]
    lines += [f"| {r['batch_size']} | {r['eval_mb']:.0f} | {r['eval_s']:.1f} | {r['acc']:.4f} |" for r in rows]
    save(args.name, {"machine": machine(), "command": "python scripts/bench.py " + " ".join(args.argv), "rows": rows},
         "\n".join(lines) + "\n")


def eval_worker(args) -> dict:
    """One lm-eval pass of MMLU 5-shot (``--limit`` questions per subject) at batch ``--batch-size``."""
    from speft_bench.data.sources import default_data_root
    from speft_bench.evaluation.lm_eval import evaluate
    from speft_bench.models import load_tokenizer, resolve_pretrained
    from speft_bench.schemas import LmEvalSchema

    torch.set_num_threads(args.threads)
    model, _, _ = load(args.model)
    _, typed = harness_config(f"model={args.model}")
    tokenizer = load_tokenizer(resolve_pretrained(typed["model"], typed["paths"].cache_dir), typed["model"])
    spec = LmEvalSchema(tasks=["mmlu"], num_fewshot={"mmlu": 5}, limit=args.limit, batch_size=args.batch_size)
    reset_peak()
    base, start = rss_mb("VmRSS"), time.perf_counter()
    metrics = evaluate(model, tokenizer, spec, default_data_root())["metrics"]
    return {"eval_mb": rss_mb("VmHWM") - base, "eval_s": time.perf_counter() - start,
            "acc": metrics["mmlu/acc,none"]}


SALIENCE_BEFORE = "2ad0b721c272e0f8ed08deeb652b30164cfaf910"  # the last commit with whole-model copies and bf16 sums


def salience_memory(args) -> None:
    """Extra peak memory of each salience metric over the loaded model, in multiples of the target weights'
    size W (fp32), BEFORE (``--before``: that commit's salience package, whole batches) and AFTER (this
    tree, micro-batches of ``--micro-batch``); each (model, version, metric) in a fresh process."""
    if args.worker:
        print(json.dumps(salience_memory_worker(args)))
        return
    rows = []
    for model_name in args.models:
        metrics = args.large_metrics if ":" in model_name else args.metrics
        for version, metric in [("after", "floor")] + [(v, m) for m in metrics for v in ("before", "after")]:
            cli = [*args.argv, "--worker", "--worker-model", model_name, "--worker-version", version,
                   "--worker-metric", metric]
            rows.append({"model": model_name, "version": version} | run_worker(cli, MMAP, "salience-memory"))
            print(json.dumps(rows[-1]), flush=True)

    def cell(row: dict, key: str) -> str:
        if "refused_over_mb" in row:
            return f"> {row['refused_over_mb'] / row['W_mb']:.1f} (refused)"
        flag = " (non-finite)" if row.get("non_finite") else ""
        return f"{row[key] / row['W_mb']:.2f}{flag}"

    lines = ["| model | metric | BEFORE ×W tensors | BEFORE ×W RSS | AFTER ×W tensors | AFTER ×W RSS "
             "| AFTER tensors − activations, ×W | BEFORE s | AFTER s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model_name in args.models:
        got = {(r["version"], r["metric"]): r for r in rows if r["model"] == model_name}
        act = got[("after", "floor")]
        lines.append(f"| {model_name}: {act['layers']} target linears, W = {act['W_mb']:,.0f} MB (fp32); largest "
                     f"layer {act['largest_layer_w']:.3f} W | activations of one micro-batch (forward + backward, "
                     f"no weight gradient) | | | {cell(act, 'tensor_mb')} | {cell(act, 'rss_mb')} | | | |")
        for metric in [m for v, m in got if v == "after" and m != "floor"]:
            b, a = got[("before", metric)], got[("after", metric)]
            data_free = metric in ("magnitude", "synflow")
            net = "" if data_free or "tensor_mb" not in a else \
                f"{(a['tensor_mb'] - act['tensor_mb']) / a['W_mb']:.2f}"
            lines.append(f"| {model_name} | {metric} | {cell(b, 'tensor_mb')} | {cell(b, 'rss_mb')} "
                         f"| {cell(a, 'tensor_mb')} | {cell(a, 'rss_mb')} | {net} "
                         f"| {b['seconds']:.0f} | {a['seconds']:.0f} |")
    note = (f"\n`python scripts/bench.py salience-memory {' '.join(args.argv)}` on {machine()}; {args.threads} "
            f"threads; each cell a fresh process. *tensors*: the peak of live tensor bytes created by the metric "
            f"(speft_bench.salience.memory.LiveBytes, op by op); *RSS*: VmHWM, reset through /proc/self/clear_refs "
            f"once the model and batches are loaded, minus RSS then (MALLOC_MMAP_THRESHOLD_=131072). Both include "
            f"the returned scores. {args.examples} synthetic causal-LM examples of {args.seq_len} tokens (first half "
            f"prompt), batches of {args.batch_size}: BEFORE runs whole batches, AFTER micro-batches of "
            f"{args.micro_batch}. Allocations beyond {args.cap_gb:g} GB (RLIMIT_AS) are refused: a lower bound.\n")
    save(args.name, {"machine": machine(), "command": "python scripts/bench.py salience-memory " + " ".join(args.argv),
                     "before": args.before, "rows": rows}, "\n".join(lines) + "\n" + note)


def old_salience(rev: str):
    """The ``speft_bench.salience`` package of commit ``rev``, imported as ``salience_<rev>`` from a temp folder."""
    import importlib
    import tempfile

    name = f"salience_{rev[:12]}"
    folder = Path(tempfile.mkdtemp(prefix="speft-old-salience-")) / name
    folder.mkdir()
    files = subprocess.run(["git", "ls-tree", "--name-only", rev, "speft_bench/salience/"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for path in files:
        text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout
        (folder / Path(path).name).write_text(text.replace("speft_bench.salience", name))
    sys.path.insert(0, str(folder.parent))
    return importlib.import_module(name)


def salience_memory_worker(args) -> dict:
    """One model, code version and metric (or ``floor``: a plain forward/backward of one micro-batch, the
    activations any data-driven metric pays): its peak over the loaded model."""
    import resource

    from speft_bench.errors import NonFiniteError
    from speft_bench.models import load_causal_lm, targets_for
    from speft_bench.salience.memory import LiveBytes
    from speft_bench.schemas import TargetScope

    torch.set_num_threads(args.threads)
    name, _, layers = args.worker_model.partition(":")
    if layers:  # the paper-scale shape with random weights, cut to `layers` blocks
        _, typed = harness_config(f"model={name}", "model.init=random", f"model.num_layers={layers}")
        torch.manual_seed(0)
        model, spec = load_causal_lm(typed["model"], None, torch.float32), typed["model"]
    else:
        model, spec, _ = load(name)
    model.requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():  # private, resident memory: a lazily mmapped checkpoint would page in mid-metric
            p.data = p.data.clone()
    weights = {n: m.weight for n, m in targets_for(model, spec, TargetScope.all).items()}
    w_mb = sum(w.numel() * w.element_size() for w in weights.values()) / 2**20
    gen = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, args.examples, args.batch_size):
        ids = torch.randint(100, 20000, (min(args.batch_size, args.examples - start), args.seq_len), generator=gen)
        labels = ids.clone()
        labels[:, : args.seq_len // 2] = -100  # prompt tokens carry no loss
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    if args.worker_version == "before":
        package, options = old_salience(args.before), {}
    else:
        import speft_bench.salience.base as package
        options = {"calibration_micro_batch": args.micro_batch}

    def plain_backward():
        piece = {k: v[: args.micro_batch] for k, v in batches[0].items()}
        embeds = model.get_input_embeddings()(piece["input_ids"]).requires_grad_()
        model(inputs_embeds=embeds, attention_mask=piece["attention_mask"], labels=piece["labels"]).loss.backward()

    metric = args.worker_metric
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (int(rss_mb("VmSize") * 2**20 + args.cap_gb * 2**30), hard))
    probe = LiveBytes()
    reset_peak()
    base, start = rss_mb("VmRSS"), time.perf_counter()
    try:
        with probe:
            if metric == "floor":
                plain_backward()
            else:
                package.compute_salience(metric, model, weights, batches, **options)
        row = {}
    except NonFiniteError:  # SynFlow overflows float64 on deep models: the memory was spent all the same
        row = {"non_finite": True}
    except (RuntimeError, MemoryError) as err:  # the allocator's "can't allocate memory" under RLIMIT_AS
        if "alloc" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        row = {"refused_over_mb": args.cap_gb * 1024}
    if "refused_over_mb" not in row:
        row |= {"tensor_mb": probe.peak / 2**20, "rss_mb": rss_mb("VmHWM") - base}
    largest = max(w.numel() * w.element_size() for w in weights.values()) / 2**20
    return {"metric": metric, "seconds": round(time.perf_counter() - start, 1), "W_mb": w_mb, "layers": len(weights),
            "largest_layer_w": largest / w_mb} | row


def parse_shape(text: str) -> tuple[int, int]:
    d_out, d_in = (int(v) for v in text.split("x"))
    return d_out, d_in


def parse_model(text: str) -> tuple[str, int, int]:
    name, _, shape = text.partition(":")
    batch, seq = (int(v) for v in (shape or "16x128").split("x"))
    return name, batch, seq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("steps", help="step time and memory per method")
    p.add_argument("--models", type=parse_model, nargs="+",
                   default=[("minilm_l6", 16, 128), ("smollm2_135m", 16, 128)],
                   help="model[:BxT], e.g. smollm2_135m:16x256")
    p.add_argument("--variants", nargs="+", default=["floor", "lora", "speft", "supertuning", "shira"],
                   choices=list(VARIANTS))
    p.add_argument("--scopes", nargs="+", default=["all"], choices=["all", "mlp", "attention"])
    p.add_argument("--r", type=int, default=8, help="LoRA rank R that sets every method's budget")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--name", default="steps", help="results/bench/<name>.{json,md}")
    p.add_argument("--single-pass", action="store_true",
                   help="time the steps in the memory process too "
                        "(half the cost; mmap'd allocations are a little slower)")
    p = sub.add_parser("salience", help="seconds per SPEFT metric on 1024 MRPC examples")
    p.add_argument("--examples", type=int, default=1024)
    p = sub.add_parser("kernels", help="SPEFT value-gradient kernels alone")
    p.add_argument("--shapes", type=parse_shape, nargs="+",
                   default=[(384, 384), (1536, 384), (384, 1536), (1024, 1024)],
                   help="d_outxd_in, e.g. 14336x4096 (default: MiniLM-L6's)")
    p.add_argument("--tokens", type=int, default=16 * 128)
    p.add_argument("--lora-rank", type=int, default=8,
                   help="the first density: LoRA-r-matched, r·(d_out + d_in) entries")
    p.add_argument("--densities", type=float, nargs="*", default=[0.05, 0.2])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--name", default="kernels", help="results/bench/<name>.{json,md}")
    p = sub.add_parser("eval-memory", help="lm-eval peak memory and time per eval batch size (MMLU 5-shot)")
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--limit", type=int, default=1, help="questions per MMLU subject (57 subjects)")
    p.add_argument("--name", default="eval_memory", help="results/bench/<name>.{json,md}")
    p = sub.add_parser("salience-memory", help="extra peak memory per salience metric, ×W, before and after")
    p.add_argument("--models", nargs="+", default=["smollm2_135m", "llama3_8b:2"],
                   help="model, or model:N for its architecture with random weights cut to N blocks")
    p.add_argument("--metrics", nargs="+", default=["magnitude", "gradient", "snip", "force", "taylor_fo", "fisher",
                                                    "grasp", "synflow"])
    p.add_argument("--large-metrics", nargs="+", default=["magnitude", "gradient", "fisher", "grasp", "synflow"],
                   help="metrics for the model:N shapes (snip, force, taylor_fo run gradient's loop plus an in-place "
                        "product: the same memory as gradient, which the smaller models show)")
    p.add_argument("--examples", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=1, help="AFTER's method.calibration_micro_batch")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--cap-gb", type=float, default=7.0, help="allocations beyond this are refused (RLIMIT_AS)")
    p.add_argument("--before", default=SALIENCE_BEFORE, help="commit whose speft_bench/salience is BEFORE")
    p.add_argument("--name", default="salience_memory", help="results/bench/<name>.{json,md}")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-model", help=argparse.SUPPRESS)
    p.add_argument("--worker-version", choices=["before", "after"], help=argparse.SUPPRESS)
    p.add_argument("--worker-metric", help=argparse.SUPPRESS)
    w = sub.add_parser("_worker")  # one configuration, in its own process; prints one JSON line
    for flag in ("--model", "--variant", "--scope"):
        w.add_argument(flag, required=True)
    for flag in ("--r", "--batch-size", "--seq-len", "--steps", "--rounds"):
        w.add_argument(flag, type=int, required=True)
    e = sub.add_parser("_eval_worker")  # one lm-eval pass, in its own process; prints one JSON line
    e.add_argument("--model", required=True)
    e.add_argument("--batch-size", type=int, required=True)
    e.add_argument("--limit", type=int, required=True)
    for p in sub.choices.values():
        p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.argv = sys.argv[2:]
    if args.command in ("_worker", "_eval_worker"):
        print(json.dumps((worker if args.command == "_worker" else eval_worker)(args)))
    else:
        {"steps": steps, "salience": salience, "kernels": kernels, "eval-memory": eval_memory,
         "salience-memory": salience_memory}[args.command](args)


if __name__ == "__main__":
    main()
