"""Dry runs: every paper-scale experiment on the meta device with exact trainable counts (closed forms from
the shipped config.json), no weights, data or hub; the activation model against autograd on tiny models."""

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from speft_bench import dry_run as dr
from speft_bench.config import validate
from speft_bench.methods.lora.config import LoraSchema
from speft_bench.methods.speft.config import SpeftSchema
from speft_bench.methods.spsft.config import SpsftSchema
from speft_bench.models import build_model, package_path
from speft_bench.schemas import Family, MethodSchema, MetricSchema, ModelInit, ModelSchema
from tests.helpers import CONF, compose_config

ARCH = Path(package_path("pkg://speft_bench/architectures"))
LLAMA_STYLE = {"llama", "qwen2", "gemma2"}


def shipped(model: str) -> dict:
    return json.loads((ARCH / f"{model}.json").read_text())


def block_linears(model: str) -> list[tuple[int, int]]:
    """(d_in, d_out) of every linear of one block, from the architecture's config.json."""
    a = shipped(model)
    h, heads = a["hidden_size"], a["num_attention_heads"]
    head_dim = a.get("head_dim", h // heads)
    q, kv = heads * head_dim, a.get("num_key_value_heads", heads) * head_dim
    i = a.get("intermediate_size", a.get("ffn_dim"))
    if a["model_type"] in LLAMA_STYLE:  # q, k, v, o, gate, up, down
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    return [(h, h)] * 4 + [(h, i), (i, h)]  # q, k, v, attention output, fc1/intermediate, fc2/output


def head_count(model: str, labels: int) -> int:
    """Trainable head of a sequence classifier (HEAD_MODULES), 0 for causal LMs (their LM head is frozen)."""
    a = shipped(model)
    h = a["hidden_size"]
    return {"bert": h * labels + labels,  # classifier (its pooler sits inside `bert.`, with the body)
            "roberta": h * h + h + h * labels + labels,  # classifier.dense + classifier.out_proj
            "deberta-v2": h * h + h + h * labels + labels,  # pooler + classifier
            "opt": a.get("word_embed_proj_dim", h) * labels}[a["model_type"]]  # score, no bias


DEPTH = 2  # experiments dry-run with model.num_layers=2: the counts are per block (full depth: test_models.py)


def lora_count(model: str, r: int, layers: int = DEPTH) -> int:
    return layers * sum(r * (d_in + d_out) for d_in, d_out in block_linears(model))


def rows_count(model: str, rows) -> int:
    """SPSFT: Σ rows(d_out) · d_in over every target linear of DEPTH blocks."""
    return DEPTH * sum(rows(d_out) * d_in for d_in, d_out in block_linears(model))


def deberta_full(layers: int = DEPTH) -> int:
    """Every parameter of DeBERTaV3-base's classifier (184,423,682 at 12 blocks) with ``layers`` blocks."""
    h = shipped("deberta_v3_base")["hidden_size"]
    block = sum(d_in * d_out + d_out for d_in, d_out in block_linears("deberta_v3_base")) + 2 * 2 * h  # + 2 LayerNorms
    return 184_423_682 - (12 - layers) * block


GLUE = {"speft_glue_bert_base": "bert_base_uncased", "speft_glue_opt125m": "opt_125m", "speft_glue_opt1_3b": "opt_1_3b",
        "speft_glue_opt350m": "opt_350m", "speft_glue_roberta_base": "roberta_base"}
LLM = {"speft_gemma2_alpaca_mmlu": "gemma2_2b", "speft_gemma2_metamath_gsm8k": "gemma2_2b",
       "speft_gemma2_oasst2_mmlu": "gemma2_2b", "speft_qwen2_alpaca_mmlu": "qwen2_7b",
       "speft_qwen2_oasst2_mmlu": "qwen2_7b"}
COMMONSENSE = {"spsft_llama2_alpaca_commonsense": "llama2_7b", "spsft_llama3_alpaca_commonsense": "llama3_8b"}
METRICS = ["magnitude", "gradient", "synflow", "snip", "force", "taylor_fo", "grasp", "fisher"]  # SPEFT Table 1's
# (experiment, overrides, model, expected trainable count): the methods each experiment's header names.  The
# GLUE experiments share SPEFT's eight metrics out between them, and the LoRA/PiSSA baselines (peft's path, as
# on the LLMs below) once each: their count is SPEFT's, which every GLUE experiment checks.
CASES = [
    ("speft_glue_bert_base", ["task=mrpc", "method=lora"], "bert_base_uncased",
     lora_count("bert_base_uncased", 8) + head_count("bert_base_uncased", 2)),
    ("speft_glue_opt350m", ["task=mrpc", "method=pissa"], "opt_350m", lora_count("opt_350m", 8) + 512 * 2),
    *[(e, ["task=mrpc", "method=speft", f"metric={metric}"], model, lora_count(model, 8) + head_count(model, 2))
      for (e, model), metric in zip([*GLUE.items(), *GLUE.items()], METRICS)],
    ("speft_masking_opt350m", ["task=mrpc", "masking=dynamic_local"], "opt_350m", lora_count("opt_350m", 8) + 512 * 2),
    *[(e, ["method=lora", "method.r=64", "method.alpha=16"], model, lora_count(model, 64)) for e, model in LLM.items()],
    *[(e, ["method=speft", "metric=gradient", "method.lora_rank=64"], model, lora_count(model, 64))
      for e, model in LLM.items()],
    ("speft_llama3_codefeedback_humaneval", ["method=lora", "method.r=64", "method.alpha=16",
                                             "task.eval.allow_code_execution=true"], "llama3_8b",
     lora_count("llama3_8b", 64)),
    ("spsft_glue_deberta", ["task=mrpc", "method=head"], "deberta_v3_base", head_count("deberta_v3_base", 2)),
    ("spsft_glue_deberta", ["task=mrpc", "method=full"], "deberta_v3_base", deberta_full()),
    *[("spsft_glue_deberta", ["task=mrpc", "method=spsft", f"metric={m}", "method.r=null", "method.fraction=0.05"],
       "deberta_v3_base", rows_count("deberta_v3_base", lambda d_out: max(1, round(0.05 * d_out)))
       + head_count("deberta_v3_base", 2)) for m in ("taylor", "l2")],
    *[(e, ["method=lora", "method.r=64", "method.alpha=16", "method.dropout=0.1"], model, lora_count(model, 64))
      for e, model in COMMONSENSE.items()],
    *[(e, ["method=spsft", "metric=l2", "method.r=128", "train.lr=2e-5"], model, rows_count(model, lambda _: 128))
      for e, model in COMMONSENSE.items()],
]


def test_every_paper_scale_experiment_is_covered():
    experiments = {p.stem for p in (CONF / "experiment").glob("sp*ft_*.yaml")}
    assert experiments == {case[0] for case in CASES}


@pytest.mark.slow
@pytest.mark.parametrize("experiment, overrides, model, trainable", CASES,
                         ids=[f"{c[0]}-{'-'.join(c[1][1:] if c[1][0].startswith('task') else c[1])}" for c in CASES])
def test_paper_experiments_dry_run_with_exact_trainable_counts(experiment, overrides, model, trainable):
    result = dr.dry_run(compose_config(f"experiment={experiment}", *overrides, f"model.num_layers={DEPTH}"))
    assert (result["model"], result["layers"]) == (model, DEPTH)
    assert result["parameters"]["trainable"] == trainable
    train = result["memory"]["train"]
    assert train["peak"] == sum(v for k, v in train.items() if k != "peak") > 0
    if result["method"] == "speft":  # the budget is LoRA's count at method.lora_rank on the same targets
        rank = 64 if "method.lora_rank=64" in overrides else 8
        assert result["method_info"]["budget"] == lora_count(model, rank)
    if result["metric"] in dr.SALIENCE_MEMORY:  # the documented multiple of the target weights
        multiple, needs_data = dr.SALIENCE_MEMORY[result["metric"]]
        body = {"fp32": 4, "bf16": 2}[result["memory"]["precision"]]
        targets = DEPTH * sum(d_in * d_out for d_in, d_out in block_linears(model))
        assert result["memory"]["salience"]["scores"] == round(multiple * targets * body)
        assert (result["memory"]["salience"]["activations"] > 0) == needs_data


def test_llama3_dry_run_is_fast_on_meta_and_reads_no_weights_data_or_hub(monkeypatch, capsys, tmp_path):
    """The CLI branch: prints the report, writes no record, never opens a checkpoint or a dataset."""
    import transformers

    from speft_bench.__main__ import main

    def forbidden(*_args, **_kwargs):
        raise AssertionError("a dry run must not load weights or data")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(forbidden))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", forbidden)
    monkeypatch.setattr("speft_bench.data.instruct.load_instruct", forbidden)
    monkeypatch.setattr("speft_bench.models.hub_reachable", forbidden)
    cfg = compose_config("experiment=spsft_llama3_alpaca_commonsense", "method=speft", "metric=gradient",
                         "method.lora_rank=64", "dry_run=true", f"paths.output_dir={tmp_path}")
    start = time.perf_counter()
    assert main.__wrapped__(cfg) is None
    assert time.perf_counter() - start < 20
    out = capsys.readouterr().out
    assert f"{lora_count('llama3_8b', 64, layers=32):,} trainable of" in out and "budget_rule: lora_rank=64" in out
    assert "train: peak" in out and "salience: peak" in out
    assert not list(tmp_path.rglob("record.json"))


def test_meta_model_holds_no_memory():
    typed = validate(compose_config("experiment=speft_qwen2_alpaca_mmlu", "method=lora"))
    model = dr.build_on_meta(typed)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the experiment's train.precision=bf16


def test_memory_terms_follow_their_closed_forms():
    """Weights at the body dtype, 16 bytes per fp32 trainable parameter (+2 for autocast's bf16 copy),
    activations linear in tokens for an SDPA model, checkpointing down to h per token per block plus one block."""
    lora = ["experiment=spsft_llama2_alpaca_commonsense", "method=lora", "method.r=64", "train.batch_size=4",
            f"model.num_layers={DEPTH}"]
    base = dr.dry_run(compose_config(*lora, "train.precision=bf16"))
    total, trainable = base["parameters"]["total"], base["parameters"]["trainable"]
    train = base["memory"]["train"]
    assert train["weights"] == (total - trainable) * 2 + 2 * 64 * 4  # + rotary inv_freq buffers: 2 × head_dim/2 fp32
    assert train["trainable"] == trainable * (16 + 2)  # fp32 tensor, gradient, 2 AdamW moments; autocast bf16 copy
    half = dr.dry_run(compose_config(*lora, "train.precision=bf16", "train.micro_batch_size=2"))["memory"]["train"]
    assert 2 * half["activations"] == train["activations"]
    ckpt = dr.dry_run(compose_config(*lora, "train.precision=bf16", "train.gradient_checkpointing=true"))["memory"]
    tokens, h, blocks = 4 * 2048, 4096, DEPTH
    loss_kept = tokens * 32000 * 4  # fp32 log-softmax over the vocabulary
    one_block, rest = divmod(train["activations"] - loss_kept, blocks)  # identical blocks
    assert rest == 0
    assert ckpt["train"]["activations"] == blocks * tokens * h * 2 + one_block + loss_kept


# --------------------------------------------------------------------------- the activation model vs autograd
TINY = {  # small widths, all distinct, so that every coefficient of the formula is exercised
    "llama3_8b": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=97),
    "qwen2_7b": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=97),

    "gemma2_2b": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                      query_pre_attn_scalar=24, vocab_size=97),
    "opt_350m": dict(hidden_size=64, ffn_dim=160, num_attention_heads=4, word_embed_proj_dim=48, vocab_size=97),
    # SDPA without attention dropout: the fused kernel CUDA runs (the CPU one falls back to maps with it)
    "bert_base_uncased": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, vocab_size=97,
                              attention_probs_dropout_prob=0.0),
    "deberta_v3_base": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, vocab_size=97,
                            pooler_hidden_size=64, position_buckets=32),
}
TOLERANCE = {"deberta_v3_base": 0.08}  # its relative attention is modelled in its main terms only


def kept_bytes(model, batch) -> int:
    """Bytes autograd keeps for backward: distinct storages of saved tensors, parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss
    return sum(kept.values())


TARGETS = {"llama": "llama", "qwen2": "llama", "gemma2": "llama", "opt": "opt", "bert": "bert", "deberta-v2": "deberta"}
METHOD_SPECS = {"lora": LoraSchema(name="lora", r=4, dropout=0.1), "full": MethodSchema(name="full"),
                "speft": SpeftSchema(name="speft", lora_rank=2), "spsft": SpsftSchema(name="spsft", r=3)}


def tiny(model: str, method: str, layers: int) -> tuple:
    """(net, body, causal): a tiny random-init model of the family, ``method`` attached (SPEFT: random
    real positions).  Built from schema objects, not Hydra, to stay fast."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from speft_bench.masking import local_budgets, lora_param_count
    from speft_bench.methods.base import prepare_without_data
    from speft_bench.methods.speft.model import SPARSE_DELTAS
    from speft_bench.models import targets_for

    model_type = shipped(model)["model_type"]
    causal = model_type in LLAMA_STYLE | {"opt"}
    targets = yaml.safe_load((CONF / "targets" / f"{TARGETS[model_type]}.yaml").read_text())
    spec = ModelSchema(name=model, pretrained="unused", family=Family.decoder if causal else Family.encoder,
                       init=ModelInit.random, architecture=f"pkg://speft_bench/architectures/{model}.json",
                       num_layers=layers, targets=targets)
    typed = {"model": spec, "method": METHOD_SPECS[method], "metric": MetricSchema("l2")}
    torch.manual_seed(0)
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    net = build_model(auto, spec, None, torch.float32, **TINY[model], **({} if causal else {"num_labels": 2}))
    body = dr.Body.of(net)
    if method == "speft":
        shapes = {n: tuple(m.weight.shape) for n, m in targets_for(net, spec, typed["method"].targets).items()}
        budgets = local_budgets(shapes, lora_param_count(shapes, 2))
        net.requires_grad_(False)
        positions = {n: torch.randperm(a * b)[:budgets[n]] for n, (a, b) in shapes.items()}
        for layer in SPARSE_DELTAS.attach(net, positions).values():
            layer.values.requires_grad_(True)
    else:
        net = prepare_without_data(net, None, typed).model
    return net.train(), body, causal


ACTIVATION_CASES = [("llama3_8b", m) for m in ("lora", "full", "speft", "spsft")] + [
    ("gemma2_2b", "lora"), ("gemma2_2b", "full"), ("qwen2_7b", "lora"), ("opt_350m", "lora"), ("opt_350m", "speft"),
    ("bert_base_uncased", "lora"), ("bert_base_uncased", "spsft"), ("deberta_v3_base", "lora")]


@pytest.fixture
def one_thread():
    """Tiny matmuls: several threads only wait on each other (and on the other jobs of a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model, method", ACTIVATION_CASES)
def test_activation_model_matches_what_autograd_keeps_per_block(model, method, one_thread):
    """One more block adds what the formula says, to 1 % (DeBERTa 8 %), LoRA dropout and RMSNorm weights included."""
    sequences, seq = 2, 40
    kept, estimated = [], []
    for layers in (1, 2):
        net, body, causal = tiny(model, method, layers)
        ids = torch.randint(3, 90, (sequences, seq))
        labels = ids if causal else torch.zeros(sequences, dtype=torch.long)
        kept.append(kept_bytes(net, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}))
        first = dr.first_block(body, net, dr.trainable_site, True)
        estimated.append(dr.activation_bytes(body, net, dr.trainable_site, first, sequences, seq, 4, True, False)[0])
    block, estimate = kept[1] - kept[0], estimated[1] - estimated[0]
    assert block > 0 and abs(estimate - block) <= TOLERANCE.get(model, 0.01) * block
