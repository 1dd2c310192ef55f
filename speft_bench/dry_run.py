"""Dry run (``dry_run=true``): a config's model and method built on the meta device, counted and costed.

``dry_run(cfg)`` validates the config, builds the task kind's model from ``model.architecture`` (else
the config at ``model.pretrained``) on the meta device — no weights, no data, no hub for the shipped
architectures — attaches the method (LoRA, DoRA, ``full``, ``head`` through their own ``prepare``;
SPEFT, SPSFT and PiSSA through placeholders with exactly their trainable tensors, since salience,
importance and PiSSA's SVD need real weights) and returns the trainable counts, the budget and a
memory estimate; ``report`` formats it.

Memory estimate of one optimizer step, in bytes, on T = micro-batch × ``task.max_length`` tokens
(sequences padded to the maximum: an upper bound).  b, a, t: bytes of the body, compute and master
dtypes (``precision.body_dtype``, ``compute_dtype``, ``master_dtype``).

* weights: frozen parameters × b, and the buffers as built (SPEFT's int32 indices, SPSFT's rows).
* trainable: per trainable parameter its tensor, gradient and AdamW's two moments (4·t), plus the
  compute-dtype copy autocast caches when t ≠ a.
* activations: what autograd keeps for backward, for every block from the first one gradients reach
  (one with a trainable parameter; earlier blocks keep nothing), per token, in a-byte elements::

      norms·(h + 1) + dropouts·h + mlp_maps·i + attention + the inputs of its trainable linears
      attention: SDPA (fused kernels)  2·q + 2·kv + heads   (q, k, v, output, log-sum-exp)
                 eager                 3·q + score_maps·heads·L   (k, v repeated to the heads; L: length)

  with h, i, q, kv the hidden, MLP, query and key/value widths (``Architecture`` holds each family's
  counts).  Linears reading one tensor keep it once (q/k/v, gate/up), none where the block keeps it
  anyway (SDPA's output, OPT's ReLU output); LoRA adds its r-wide B input, with dropout a mask and
  copy (2·d_in) instead of the input; a trainable RMSNorm weight adds h.  DeBERTa adds its relative
  attention: 2 (heads × 2·buckets) score maps per token, its projected position keys and queries per
  sequence, and 2 int64 L × L indices.  Checkpointing keeps h per token per block, plus one block
  recomputed.  A causal LM's loss keeps the fp32 log-softmax, 4·V per token (Gemma2's softcap: + a·V).
* transient: the largest of one block's activation gradients, the loss's logits and fp32 gradient
  ((4 + a)·V per token), and SPEFT's dense W + Δ (or gᵀx) of its widest target, at ≤ 4 bytes.
* peak = weights + trainable + activations + transient.

Salience (SPEFT metrics, SPSFT importance; ``SALIENCE_MEMORY``): the unadapted model's weights, a
documented multiple of W (its target weights' bytes) and, for data-driven metrics, one calibration
micro-batch's activations in eval mode with gradients on the target weights only.

Checked against autograd's saved tensors on tiny models of every family (``tests/test_dry_run.py``:
within 1 %, DeBERTa 8 %, asserted); not yet against a measured peak.  Not counted: the allocator's caching
and fragmentation, the CUDA context, tensors outside the blocks other than the loss (~h per token),
DoRA's extra outputs, CPU SDPA's unfused fallback under attention dropout, ``method.salience_offload``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch import nn

from speft_bench import precision
from speft_bench.adapters import wrap_linears
from speft_bench.config import validate
from speft_bench.errors import ConfigError
from speft_bench.masking import local_budgets
from speft_bench.methods.base import Prepared, freeze_all_but, prepare_without_data
from speft_bench.methods.lora.config import LoraInit
from speft_bench.methods.speft.layer import SparseDeltaLinear
from speft_bench.methods.speft.method import budget as speft_budget
from speft_bench.methods.speft.method import budget_rule
from speft_bench.methods.spsft.method import attach_trainable_rows, rows_per_layer
from speft_bench.models import head_parameters, is_norm, parameter_counts, resolve_pretrained, targets_for
from speft_bench.schemas import ModelInit
from speft_bench.tasks import TASK_KINDS

GIB = 1024 ** 3


# --------------------------------------------------------------------------- per-family activation model
@dataclass(frozen=True)
class Architecture:
    """What one block of a model family keeps for backward besides the inputs of its trainable linears.

    The counts enter ``block_bytes`` (module docstring); the ``*_key`` fields name config keys.
    """

    norms: int  # norm layers per block: each keeps its input (h) and 1/σ (1)
    mlp_maps: int  # i-wide MLP tensors: act(gate)·up keeps gate, act(gate), up (3); GELU its input, ReLU its output (1)
    out_proj: str  # the attention output projection: under SDPA its input is the kept attention output
    free_inputs: tuple[str, ...] = ()  # linears whose input another kept tensor already is (OPT's fc2: ReLU's output)
    rms_norm: bool = False  # an RMSNorm with a trainable weight keeps its normalised input too (h)
    score_maps: int = 1  # eager attention's (heads × L) maps: the softmax (+ Gemma2's softcap tanh)
    relative_maps: int = 0  # disentangled attention's relative terms (DeBERTa: c2p and p2c)
    dropouts: int = 0  # residual-stream dropouts per block (each keeps an h-wide mask in training, if p > 0)
    dropout_key: str | None = None
    attention_dropout_key: str | None = None  # eager attention keeps a mask and the dropped maps when p > 0
    logit_maps: int = 0  # V-wide maps kept after the LM head (Gemma2's final softcap tanh)
    intermediate_key: str = "intermediate_size"


LLAMA = Architecture(norms=2, mlp_maps=3, out_proj="self_attn.o_proj", rms_norm=True)
BERT = Architecture(norms=2, mlp_maps=1, out_proj="attention.output.dense", dropouts=2,
                    dropout_key="hidden_dropout_prob", attention_dropout_key="attention_probs_dropout_prob")
ARCHITECTURES: dict[str, Architecture] = {  # by transformers' config.model_type
    "llama": LLAMA,
    "qwen2": LLAMA,
    "gemma2": dataclasses.replace(LLAMA, norms=4, score_maps=2, logit_maps=1,
                                  attention_dropout_key="attention_dropout"),
    "opt": Architecture(norms=2, mlp_maps=1, out_proj="self_attn.out_proj", free_inputs=("fc2",), dropouts=2,
                        dropout_key="dropout", intermediate_key="ffn_dim"),
    "bert": BERT,
    "roberta": BERT,
    "deberta-v2": dataclasses.replace(BERT, relative_maps=2),
}

# Salience peak beyond the frozen model, as a multiple of W (the target weights' bytes), and whether a
# calibration micro-batch's activations are held (data-driven metrics).  Measured, scores included
# (BENCHMARKS.md "Salience memory", `python scripts/bench.py salience-memory`); SPSFT's importance
# scores are per row, its Taylor pass one fp32 gradient buffer.
SALIENCE_MEMORY: dict[str, tuple[float, bool]] = {
    "magnitude": (1.0, False),  # |θ| into the fp32 score buffers
    # E[g] + one layer's .grad
    "gradient": (1.15, True), "snip": (1.15, True), "force": (1.15, True), "taylor_fo": (1.15, True),
    "fisher": (1.15, True),  # E[g²], one micro-batch's gradients folded in layer by layer
    "grasp": (3.3, True),  # E[g], Hg and the double backward's first contribution per weight
    "synflow": (1.2, False),  # scores, packed sign bits, one float64 row chunk
    "l2": (0.0, False),  # SPSFT: row norms only
    "taylor": (1.15, True), "qm_taylor": (1.15, True),  # SPSFT: E[g] over all, or one label's, examples
}


@dataclass(frozen=True)
class Dims:
    hidden: int
    intermediate: int
    heads: int
    q: int  # heads × head_dim
    kv: int  # key/value heads × head_dim
    buckets: int  # relative-position buckets (DeBERTa); 0 otherwise


def dims_of(config, arch: Architecture) -> Dims:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    buckets = getattr(config, "position_buckets", 0) or 0
    return Dims(config.hidden_size, getattr(config, arch.intermediate_key), heads, heads * head_dim,
                kv_heads * head_dim, buckets if buckets > 0 else max(0, getattr(config, "max_relative_positions", 0)))


def _probability(config, key: str | None) -> float:
    return float(getattr(config, key, 0.0) or 0.0) if key else 0.0


def block_bytes(arch: Architecture, dims: Dims, config, sequences: int, seq: int, inputs: int, norm_weights: int,
                act_bytes: int, training: bool, eager: bool) -> int:
    """Bytes one block keeps for backward on ``sequences`` × ``seq`` tokens (module docstring).

    ``inputs``: the kept inputs of its trainable linears per token; ``norm_weights``: its norms with a
    trainable weight (an RMSNorm then keeps its normalised input too); ``training``: dropout active;
    ``eager``: attention materialises its maps (``config._attn_implementation == "eager"``).
    """
    d, tokens = dims, sequences * seq
    dropouts = arch.dropouts if training and _probability(config, arch.dropout_key) > 0 else 0
    per_token = (arch.norms * (d.hidden + 1) + (norm_weights if arch.rms_norm else 0) * d.hidden
                 + dropouts * d.hidden + arch.mlp_maps * d.intermediate + inputs)
    if not eager:
        return tokens * (per_token + 2 * d.q + 2 * d.kv + d.heads) * act_bytes
    maps = arch.score_maps + (2 if training and _probability(config, arch.attention_dropout_key) > 0 else 0)
    span = 2 * d.buckets  # DeBERTa: c2p/p2c scores per token, projected position keys/queries per sequence,
    relative = arch.relative_maps * (tokens * d.heads * span + sequences * d.q * span)  # and int64 L × L indices
    return ((tokens * (per_token + 3 * d.q + maps * d.heads * seq) + relative) * act_bytes
            + arch.relative_maps * seq * seq * 8)


@dataclass
class Body:
    """The meta model's blocks and, per block, its linears before any adapter: full name → (parent, d_in)."""

    arch: Architecture
    dims: Dims
    eager: bool
    blocks: list[nn.Module]
    sites: list[dict[str, tuple[str, int]]]

    @classmethod
    def of(cls, model: nn.Module) -> "Body":
        model_type = model.config.model_type
        if model_type not in ARCHITECTURES:
            raise ConfigError(f"dry_run=true has no activation model for model_type={model_type!r}; "
                              f"known: {', '.join(sorted(ARCHITECTURES))}")
        depth = model.config.num_hidden_layers  # the blocks: the ModuleList as long as the model is deep
        name, blocks = next((n, m) for n, m in model.named_modules()
                            if isinstance(m, nn.ModuleList) and len(m) == depth)
        sites = [{f"{name}.{i}.{n}": (f"{name}.{i}.{n}".rpartition(".")[0], m.in_features)
                  for n, m in block.named_modules() if isinstance(m, nn.Linear)} for i, block in enumerate(blocks)]
        arch = ARCHITECTURES[model_type]
        return cls(arch, dims_of(model.config, arch), model.config._attn_implementation == "eager", list(blocks), sites)


Trains = Callable[[str, nn.Module], bool]  # (full name of a linear site, the module there now) -> keeps its input


def trainable_site(_name: str, module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def kept_inputs(body: Body, model: nn.Module, sites: dict[str, tuple[str, int]], trains: Trains,
                training: bool) -> int:
    """Elements per token the trainable linears of one block keep: each input once (linears of one parent
    reading one width share it, as q/k/v and gate/up do), none for inputs kept anyway, plus the r-wide
    input of LoRA's B (an inner trainable linear narrower than the site).  With LoRA dropout (in
    training) an adapted linear keeps its own mask and dropped copy (2 × d_in) instead of the input."""
    free = body.arch.free_inputs + (() if body.eager else (body.arch.out_proj,))
    groups, inner = set(), 0
    for name, (parent, width) in sites.items():
        module = model.get_submodule(name)
        if not trains(name, module):
            continue
        inner += sum(m.in_features for m in module.modules()
                     if isinstance(m, nn.Linear) and m.in_features != width and m.weight.requires_grad)
        if training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules()):
            inner += 2 * width
        elif not name.endswith(tuple(f".{suffix}" for suffix in free)):
            groups.add((parent, width))
    return sum(width for _, width in groups) + inner


def activation_bytes(body: Body, model: nn.Module, trains: Trains, first: int, sequences: int, seq: int,
                     act_bytes: int, training: bool, checkpointing: bool) -> tuple[int, int]:
    """(kept bytes, the largest block's bytes) of blocks ``first`` … for ``sequences`` × ``seq`` tokens."""
    per_block = []
    for block, sites in list(zip(body.blocks, body.sites))[first:]:
        norm_weights = sum(1 for m in block.modules() if is_norm(m) and getattr(m, "weight", None) is not None
                           and m.weight.requires_grad) if training else 0
        per_block.append(block_bytes(body.arch, body.dims, model.config, sequences, seq,
                                     kept_inputs(body, model, sites, trains, training), norm_weights, act_bytes,
                                     training, body.eager))

    largest = max(per_block, default=0)
    if checkpointing:  # each block keeps its input; one is recomputed at a time in backward
        return len(per_block) * sequences * seq * body.dims.hidden * act_bytes + largest, largest
    return sum(per_block), largest


def loss_bytes(model: nn.Module, arch: Architecture, sequences: int, seq: int, act_bytes: int) -> tuple[int, int]:
    """(kept, transient) bytes of the loss: a causal LM's V-wide logits per token; a classifier's are tiny."""
    head = model.get_output_embeddings()
    rows, width = (sequences * seq, head.out_features) if head is not None else (sequences, model.config.num_labels)
    return rows * width * (4 + arch.logit_maps * act_bytes), rows * width * (4 + act_bytes)


def buffer_bytes(model: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers())


# --------------------------------------------------------------------------- methods on the meta device
def _sparse_placeholder(linear: nn.Linear, k: int) -> SparseDeltaLinear:
    """A SparseDeltaLinear with k entries on a meta ``linear``: ``set_mask`` checks index values, which
    meta tensors do not have, so it is built on an empty CPU mask and given meta indices and values."""
    layer = SparseDeltaLinear(nn.Linear(1, 1, device="cpu"), torch.empty(0, dtype=torch.int64, device="cpu"))
    layer.base = linear.requires_grad_(False)
    fits_int32 = linear.weight.numel() <= torch.iinfo(torch.int32).max
    layer.indices = torch.empty(k, dtype=torch.int32 if fits_int32 else torch.int64, device="meta")
    layer.values = nn.Parameter(torch.empty(k, dtype=linear.weight.dtype, device="meta"))
    return layer


def speft_placeholder(model: nn.Module, cfg: DictConfig, typed: dict[str, Any]) -> Prepared:
    """SPEFT's budget k (LoRA's count at method.lora_rank, or density), split over the targets in
    proportion to their size, with placeholder positions: the counts of a real mask, no salience."""
    spec = typed["method"]
    shapes, k, total = speft_budget(targets_for(model, typed["model"], spec.targets), spec, typed["model"].name)
    budgets = local_budgets(shapes, k)
    model.requires_grad_(False)
    layers = wrap_linears(model, budgets, lambda name, linear: _sparse_placeholder(linear, budgets[name]))
    trainable = {f"{name}.values": layer.values for name, layer in layers.items()}
    freeze_all_but(model, trainable | (head_parameters(model) if spec.train_head else {}))
    return Prepared(model, {"budget": k, "target_weights": total, "density": k / total, "target_modules": len(layers),
                            "budget_rule": budget_rule(spec)})


def spsft_placeholder(model: nn.Module, cfg: DictConfig, typed: dict[str, Any]) -> Prepared:
    """SPSFT's rows per target (method.r or fraction), the first ones as placeholders: the real counts."""
    spec = typed["method"]
    targets = targets_for(model, typed["model"], spec.targets)
    rows = {name: torch.arange(rows_per_layer(spec, name, m.out_features), device="cpu")  # checked by value
            for name, m in targets.items()}
    layers, groups = attach_trainable_rows(model, targets, rows, spec)
    trainable = {group: sum(p.numel() for p in params.values()) for group, params in groups.items()}
    return Prepared(model, {"budget_rule": f"fraction={spec.fraction}" if spec.fraction is not None else f"r={spec.r}",
                            "rows": sum(len(r) for r in rows.values()), "target_modules": len(layers),
                            "trainable": trainable | {"total": sum(trainable.values())}})


def pissa_placeholder(model: nn.Module, cfg: DictConfig, typed: dict[str, Any]) -> Prepared:
    """PiSSA's adapters initialised as LoRA's: the same parameters, without the SVD of weights meta lacks."""
    gaussian = typed | {"method": dataclasses.replace(typed["method"], init=LoraInit.gaussian)}
    return prepare_without_data(model, cfg, gaussian)


# method.name -> how the dry run attaches it; others run their own prepare (it needs no data)
PLACEHOLDERS: dict[str, Callable[[nn.Module, DictConfig, dict[str, Any]], Prepared]] = {
    "speft": speft_placeholder,
    "spsft": spsft_placeholder,
    "pissa": pissa_placeholder,
}
# Bytes per weight element of the dense transient a wrapper makes, one layer at a time: SPEFT's W + Δ (in
# forward, again in backward) or its dense value-gradient product gᵀx, one after the other, ≤ fp32.
DENSE_TRANSIENT: dict[type, int] = {SparseDeltaLinear: 4}


def attach(model: nn.Module, cfg: DictConfig, typed: dict[str, Any]) -> Prepared:
    """The method on the meta model: its placeholder, or its own ``prepare`` (which must draw no data).

    Under the meta device, so that adapters (peft creates them on the CPU, then moves them) cost nothing.
    """
    name = typed["method"].name
    with torch.device("meta"):
        if name in PLACEHOLDERS:
            return PLACEHOLDERS[name](model, cfg, typed)
        return prepare_without_data(model, cfg, typed)


# --------------------------------------------------------------------------- the dry run
def build_on_meta(typed: dict[str, Any]) -> nn.Module:
    """The task kind's model, shapes only: from model.architecture, else the config at model.pretrained."""
    spec, train = typed["model"], typed["train"]
    source = None if spec.architecture is not None else resolve_pretrained(spec, typed["paths"].cache_dir)
    kind = TASK_KINDS[typed["task"].kind.name](typed["task"], typed["paths"])
    with torch.device("meta"):  # init=random builds from the config on the current device: nothing allocated
        return kind.load_model(dataclasses.replace(spec, init=ModelInit.random), source, None,
                               precision.body_dtype(train.precision))


def first_block(body: Body, model: nn.Module, trains: Trains, training: bool) -> int:
    """The first block gradients reach: one with a site that ``trains`` (or, in training, any trainable
    parameter); 0 when the input embeddings train; past the last block when none does."""
    if training and model.get_input_embeddings().weight.requires_grad:
        return 0
    return next((i for i, (block, sites) in enumerate(zip(body.blocks, body.sites))
                 if any(trains(n, model.get_submodule(n)) for n in sites)
                 or (training and any(p.requires_grad for p in block.parameters()))), len(body.blocks))


def training_memory(model: nn.Module, body: Body, typed: dict[str, Any]) -> dict[str, int]:
    """Bytes of one optimizer step (module docstring): weights, trainable state, activations, transient, peak."""
    train, seq = typed["train"], typed["task"].max_length
    b, a = precision.body_dtype(train.precision).itemsize, precision.compute_dtype(train).itemsize
    t = precision.master_dtype(train).itemsize
    counts, sequences = parameter_counts(model), train.micro_batch_size or train.batch_size
    autocast_copy = a if t != a else 0  # autocast caches a compute-dtype copy of each master for the step
    memory = {"weights": (counts["total"] - counts["trainable"]) * b + buffer_bytes(model),
              "trainable": counts["trainable"] * (4 * t + autocast_copy), "activations": 0, "transient": 0}
    if counts["trainable"]:  # method=pretrained takes no step
        kept, largest = activation_bytes(body, model, trainable_site, first_block(body, model, trainable_site, True),
                                         sequences, seq, a, True, train.gradient_checkpointing)
        loss_kept, loss_transient = loss_bytes(model, body.arch, sequences, seq, a)
        dense = max((DENSE_TRANSIENT[type(m)] * m.base.weight.numel() for m in model.modules()
                     if type(m) in DENSE_TRANSIENT), default=0)
        memory |= {"activations": kept + loss_kept, "transient": max(largest, loss_transient, dense)}
    return memory | {"peak": sum(memory.values())}


def salience_memory(model: nn.Module, body: Body, typed: dict[str, Any], targets: set[str],
                    base: dict[str, int]) -> dict[str, int]:
    """Bytes of the salience (or SPSFT importance) pass on the model before its adapters (module docstring).

    ``base``: ``weights`` and ``target_weights`` (elements) of that model.
    """
    train, method, metric = typed["train"], typed["method"], typed["metric"]
    multiple, needs_data = SALIENCE_MEMORY[metric.name]
    b, a = precision.body_dtype(train.precision).itemsize, precision.compute_dtype(train).itemsize
    memory = {"weights": base["weights"] * b + base["buffers"], "scores": round(multiple * base["target_weights"] * b),
              "activations": 0}
    if needs_data:
        sequences = (getattr(metric, "micro_batch", None) or method.calibration_micro_batch
                     or method.calibration_batch_size)
        is_target = lambda name, _module: name in targets  # noqa: E731  (gradients on the target weights only)
        kept, largest = activation_bytes(body, model, is_target, first_block(body, model, is_target, False), sequences,
                                         typed["task"].max_length, a, False, False)
        loss_kept, loss_transient = loss_bytes(model, body.arch, sequences, typed["task"].max_length, a)
        memory["activations"] = kept + loss_kept + max(largest, loss_transient)
    return memory | {"peak": sum(memory.values())}


def dry_run(cfg: DictConfig) -> dict[str, Any]:
    """Counts, budget and memory estimate of ``cfg`` without weights or data (module docstring)."""
    typed = validate(cfg)
    spec_model, method, metric = typed["model"], typed["method"], typed["metric"]
    model = build_on_meta(typed)
    body = Body.of(model)
    base = {"weights": parameter_counts(model)["total"], "buffers": buffer_bytes(model)}
    targets = set(targets_for(model, spec_model, method.targets)) if metric.name in SALIENCE_MEMORY else set()
    base["target_weights"] = sum(model.get_submodule(name).weight.numel() for name in targets)

    prepared = attach(model, cfg, typed)
    counts = parameter_counts(prepared.model)
    memory = {"device": typed["train"].device, "precision": typed["train"].precision,
              "tokens": (typed["train"].micro_batch_size or typed["train"].batch_size) * typed["task"].max_length,
              "gradient_checkpointing": typed["train"].gradient_checkpointing,
              "train": training_memory(prepared.model, body, typed)}
    if metric.name in SALIENCE_MEMORY:
        memory["salience"] = salience_memory(model, body, typed, targets, base)
    return {"model": spec_model.name, "architecture": spec_model.architecture or spec_model.pretrained,
            "model_type": model.config.model_type, "layers": len(body.blocks), "task": typed["task"].name,
            "method": method.name, "metric": metric.name,
            "parameters": counts | {"trainable_percent": 100 * counts["trainable"] / counts["total"]},
            "method_info": prepared.info, "memory": memory}


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_shown(v)}" for k, v in value.items())
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}" if isinstance(value, float) else str(value)


def _gib(n: int) -> str:
    return f"{n / GIB:,.2f} GiB"


def report(result: dict[str, Any]) -> str:
    """The dry run's result as the lines ``python -m speft_bench ... dry_run=true`` prints."""
    p, m = result["parameters"], result["memory"]
    lines = [f"dry run: model={result['model']} ({result['model_type']}, {result['layers']} blocks, "
             f"{result['architecture']}) task={result['task']} method={result['method']} metric={result['metric']}",
             f"  parameters: {p['trainable']:,} trainable of {p['total']:,} ({p['trainable_percent']:.4f}%)"]
    lines += [f"  {key}: {_shown(value)}" for key, value in result["method_info"].items()]
    lines.append(f"  memory estimate, train.device={m['device']} precision={m['precision']} "
                 f"{m['tokens']:,} tokens per micro-batch, checkpointing={m['gradient_checkpointing']}:")
    for phase in ("train", "salience"):
        if phase in m:
            parts = ", ".join(f"{k} {_gib(v)}" for k, v in m[phase].items() if k != "peak")
            lines.append(f"    {phase}: peak {_gib(m[phase]['peak'])} ({parts})")
    return "\n".join(lines)
