"""A run's saved adapter on the base model is the trained model: logits bit for bit, for every method.

The head is trained (a high learning rate moves it far from its init) and the fresh base gets a
different random head, so a file without the head, the trained norms or a dynamic mask's merged
refreshes gives other logits.
"""

import json
import stat

import pytest
import torch

from speft_bench import export
from speft_bench.config import validate
from speft_bench.methods import METHODS
from speft_bench.methods.base import MethodContext
from speft_bench.run import run
from tests.helpers import TINY_MRPC, compose_config

pytestmark = pytest.mark.slow  # every test here trains, saves or sweeps

SPARSE = ("method.lora_rank=2", "method.calibration_examples=8", "method.calibration_batch_size=4")
# method overrides -> the modules a merged export must not contain any more
CASES = {
    "speft": ("method=speft", "metric=gradient", *SPARSE),
    "speft-dynamic": ("method=speft", "metric=gradient", "masking=dynamic_global", "masking.interval=1", *SPARSE),
    "spsft-norms": ("method=spsft", "metric=taylor", "method.r=4", "method.train_norms=true",
                    "method.calibration_examples=8", "method.calibration_batch_size=4"),
    "lora": ("method=lora", "method.r=2"),
    "pissa": ("method=pissa", "method.r=2"),
    "dora": ("method=dora", "method.r=2"),
    "head": ("method=head",),
    "full": ("method=full",),
}


def tiny_bert(seed: int):
    """A 2-block random BERT classifier: the same body for every seed (the "pretrained" weights), a head drawn
    from ``seed``."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    model = BertForSequenceClassification(config)
    torch.manual_seed(seed)
    model.classifier.reset_parameters()
    return model


def batches(n: int = 4):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, 97, (4, 12), generator=g),
             "attention_mask": torch.ones(4, 12, dtype=torch.long),
             "labels": torch.randint(0, 2, (4,), generator=g)} for _ in range(n)]


def train_and_save(overrides, run_dir):
    """Prepare the method on a tiny BERT, train 4 steps at lr 0.05, save;
    return (model, logits, typed, record entry)."""

    cfg = compose_config("task=mrpc", *overrides)
    typed = validate(cfg)
    data = batches()
    ctx = MethodContext(cfg, typed, calibration_batches=lambda round_, n, size: data[:2])
    prepared = METHODS[typed["method"].name]().prepare(tiny_bert(seed=0), ctx)
    model = prepared.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for step, batch in enumerate(data):
        if prepared.on_step is not None:
            prepared.on_step(step, optimizer)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        logits = model(**data[0]).logits
    run_dir.mkdir(parents=True, exist_ok=True)
    return model, logits, typed, prepared.save(run_dir)


@pytest.mark.parametrize("case", CASES)
def test_the_saved_adapter_on_the_base_model_gives_the_trained_logits(tmp_path, case):
    model, logits, typed, saved = train_and_save(CASES[case], tmp_path)
    assert (tmp_path / saved["path"]).exists() and saved["numel"]["dense"] > 0  # the head, at least
    base = tiny_bert(seed=1)
    with torch.no_grad():
        assert not torch.equal(base(**batches()[0]).logits, logits)
    reloaded = METHODS[typed["method"].name].load(base, tmp_path, typed).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batches()[0]).logits, logits)
    if case == "speft-dynamic":  # 3 refreshes merged into W: their entries travel as W's values
        assert saved["numel"]["base_weight_entries"] > 0


@pytest.mark.parametrize("case", ["speft-dynamic", "spsft-norms", "lora", "dora"])
def test_a_merged_export_is_plain_transformers_with_the_same_predictions(tmp_path, case):
    from transformers import AutoModelForSequenceClassification

    _, logits, typed, _ = train_and_save(CASES[case], tmp_path / "run")
    reloaded = METHODS[typed["method"].name].load(tiny_bert(seed=1), tmp_path / "run", typed)  # as the CLI does
    plain = export.merged(reloaded)
    assert {type(m).__module__.split(".")[0] for m in plain.modules()} <= {"torch", "transformers"}
    plain.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        merged_logits = loaded(**batches()[0]).logits
    torch.testing.assert_close(merged_logits, logits, rtol=1e-4, atol=1e-5)  # W + Δ rounds once per entry
    assert torch.equal(merged_logits.argmax(-1), logits.argmax(-1))


def test_lora_saves_a_peft_adapter_with_its_head(tmp_path):
    from peft import PeftConfig

    _, _, _, saved = train_and_save(CASES["lora"], tmp_path)
    config = PeftConfig.from_pretrained(tmp_path / saved["path"])
    assert config.modules_to_save == ["classifier"] and config.r == 2 and config.task_type == "SEQ_CLS"
    # 2 blocks × 6 linears × r·(d_in + d_out) with d = 32 (the MLP's 64): A and B; the head 32·2 + 2
    assert saved["numel"] == {"adapter": 2 * (4 * 2 * 64 + 2 * 2 * 96), "dense": 66}


TINY_RUN = (*TINY_MRPC, "task.eval_limit=16", "train.max_steps=3", "train.lr=0.02")


def test_a_finished_run_reloads_from_its_folder_with_the_same_dev_metrics(tmp_path, capsys, group_umask):
    cfg = compose_config("method=speft", "metric=gradient", "masking=dynamic_global", "masking.interval=1",
                         "method.calibration_examples=8", "method.calibration_batch_size=4", *TINY_RUN)
    record = run(cfg, tmp_path)
    assert record["adapter"]["path"] == "adapter.safetensors" and "load_trained" in record["adapter"]["reload"]
    trained = export.load_trained(tmp_path)
    assert trained.evaluate()["metrics"] == record["metrics"]  # eval_loss included: every logit the same
    export.main([str(tmp_path), "--evaluate", "--merged", str(tmp_path / "merged")])
    assert json.loads(capsys.readouterr().out.split("merged model written")[0])["identical"] is True
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "merged").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o640, modes
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o750
