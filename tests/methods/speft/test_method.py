"""SPEFT end to end on MiniLM-L6 + real MRPC: every metric, every masking, LoRA-matched budget, dynamic refresh."""

import pytest
import torch

from speft_bench.config import validate
from speft_bench.masking import mask_digest
from speft_bench.methods import METHODS
from speft_bench.methods.base import MethodContext
from speft_bench.methods.speft.model import SPARSE_DELTAS
from speft_bench.run import calibration_sampler, run
from speft_bench.salience import SALIENCE_METRICS
from tests.helpers import CALIBRATION, CONF, TINY_MRPC, compose_config

METRICS = SALIENCE_METRICS.names()
MASKINGS = sorted(p.stem for p in (CONF / "masking").glob("*.yaml"))
TINY = (*TINY_MRPC, *CALIBRATION)


def test_the_eight_metrics_and_four_maskings_exist():
    assert METRICS == ["fisher", "force", "gradient", "grasp", "magnitude", "snip", "synflow", "taylor_fo"]
    assert set(METRICS) <= {p.stem for p in (CONF / "metric").glob("*.yaml")}  # each one a config option
    assert MASKINGS == ["dynamic_global", "dynamic_local", "static_global", "static_local"]


# Every metric once (static_global) and every masking once (gradient): a refresh calls the same metric
# function a static mask does.  Plus a refresh by the two metrics that change the model in place while
# they score it (SynFlow's signs and module swaps, GRaSP's attention kernel) in the middle of training.
CASES = ([(metric, "static_global") for metric in METRICS] + [("gradient", m) for m in MASKINGS if m != "static_global"]
         + [("synflow", "dynamic_global"), ("grasp", "dynamic_local")])


@pytest.mark.slow
@pytest.mark.parametrize(("metric", "masking"), CASES)
def test_every_metric_and_masking_runs_end_to_end(tmp_path, metric, masking):
    refresh = ["masking.interval=1"] if masking.startswith("dynamic") else []  # a static mask rejects the knob
    cfg = compose_config("method=speft", f"metric={metric}", f"masking={masking}", *refresh, *TINY)
    record = run(cfg, tmp_path)
    assert record["status"] == "completed"
    # budget = LoRA r=8 on the same 36 linears; + the dense classifier head (770)
    assert record["method"]["budget"] == 331_776
    assert record["parameters"]["trainable"] == 331_776 + 770
    assert len(record["method"]["refreshes"]) == (1 if masking.startswith("dynamic") else 0)


@pytest.mark.slow
def test_dynamic_mask_really_recomputes_salience(tmp_path, monkeypatch):
    import speft_bench.methods.speft.method as speft

    masks = {}  # digest -> the mask it was computed from: the record names each mask by its digest

    def digest(mask):
        masks[key := mask_digest(mask)] = {name: set(idx.tolist()) for name, idx in mask.items()}
        return key

    monkeypatch.setattr(speft, "mask_digest", digest)
    cfg = compose_config("method=speft", "metric=gradient", "masking=dynamic_global", "masking.interval=2",
                         *TINY, "train.max_steps=5")
    method = run(cfg, tmp_path)["method"]
    refreshes = method["refreshes"]
    assert [r["step"] for r in refreshes] == [2, 4]
    assert all(r["examples"] == 8 and r["salience_s"] > 0 and r["optimizer_reset"] == "all" for r in refreshes)
    # each recorded overlap is |previous ∩ new| / |previous| of the two recorded masks, recomputed here
    digests = [method["mask_sha256"]] + [r["mask_sha256"] for r in refreshes]
    for previous, new, refresh in zip(digests, digests[1:], refreshes):
        a, b = masks[previous], masks[new]
        kept = sum(len(a[name] & b[name]) for name in a) / sum(len(a[name]) for name in a)
        assert refresh["overlap"] == pytest.approx(kept, abs=1e-12)
        assert 0.0 < kept < 1.0  # fresh calibration batches and trained weights change the selection


def calibration(round_: int, n: int, size: int) -> list[dict]:
    gen = torch.Generator().manual_seed(round_)  # each round a fresh sample, as calibration_sampler draws
    return [{"input_ids": torch.randint(1000, 20000, (size, 16), generator=gen),
             "attention_mask": torch.ones(size, 16, dtype=torch.long),
             "labels": torch.randint(0, 2, (size,), generator=gen)} for _ in range(n // size)]


def one_step(model, optimizer, batch) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.slow
@pytest.mark.parametrize("reset", ["all", "values"])
def test_a_refresh_resets_the_optimizer_state_it_names(minilm, reset):
    cfg = compose_config("method=speft", "metric=gradient", "masking=dynamic_global", "masking.interval=3",
                         f"masking.optimizer_reset={reset}", *TINY)
    typed = validate(cfg)
    prepared = METHODS["speft"]().prepare(minilm(), MethodContext(cfg, typed, calibration))
    model, layers = prepared.model.train(), SPARSE_DELTAS.layers(prepared.model)
    values = {id(layer.values) for layer in layers.values()}
    params = [p for p in model.parameters() if p.requires_grad]
    head = [p for p in params if id(p) not in values]
    assert len(head) == 2 and len(params) == 36 + 2  # classifier weight and bias
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    batch = calibration(7, 4, 4)[0]
    prepared.on_step(0, optimizer)  # not a refresh step
    one_step(model, optimizer, batch)
    assert {id(p) for p in optimizer.state} == {id(p) for p in params}

    prepared.on_step(3, optimizer)  # a refresh: a new mask, values zeroed
    held = {id(p) for p in optimizer.state}
    assert held == ({id(p) for p in head} if reset == "values" else set())
    assert prepared.info["refreshes"][-1]["step"] == 3 and prepared.info["refreshes"][-1]["optimizer_reset"] == reset
    lr = optimizer.param_groups[0]["lr"]
    one_step(model, optimizer, batch)  # fresh moments, sized for the new entries
    assert optimizer.param_groups[0]["lr"] == lr  # the schedule's lr is the param group's: kept
    assert all(optimizer.state[layer.values]["step"] == 1 for layer in layers.values())
    assert all(optimizer.state[p]["step"] == (2 if reset == "values" else 1) for p in head)
    assert all(layer.values.count_nonzero() == layer.k for layer in layers.values())  # every new entry moved


def test_calibration_rounds_draw_fresh_examples():
    data = [{"input_ids": [i], "labels": i} for i in range(100)]
    collate = lambda items: {"labels": torch.tensor([x["labels"] for x in items])}  # noqa: E731
    sample = calibration_sampler(data, collate, 0, torch.device("cpu"))
    first, again, second = sample(0, 16, 8), sample(0, 16, 8), sample(1, 16, 8)
    assert [b["labels"].tolist() for b in first] == [b["labels"].tolist() for b in again]
    assert torch.cat([b["labels"] for b in first]).tolist() != torch.cat([b["labels"] for b in second]).tolist()
    assert [len(b["labels"]) for b in first] == [8, 8]


@pytest.mark.slow
def test_the_authors_knobs_reach_salience_and_selection(minilm, monkeypatch):
    """metric.variant (GRaSP's reference draws two sets), method.calibration_mode and masking.local_split."""
    import speft_bench.methods.speft.method as speft

    seen = {}

    def scores(name, model, weights, batches, **options):  # records what the metric would get
        seen.update(options, name=name, examples=sum(len(b["labels"]) for b in batches))
        return {n: torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) for n, w in weights.items()}

    monkeypatch.setattr(speft, "compute_salience", scores)
    cfg = compose_config("method=speft", "metric=grasp", "metric.variant=reference", "masking=static_local",
                         "masking.local_split=equal", "method.calibration_mode=train", *TINY)
    typed = validate(cfg)
    asked = []

    def batches(round_, n, size):
        asked.append(n)
        return [{"labels": torch.zeros(size, dtype=torch.long)} for _ in range(n // size)]

    info = METHODS["speft"]().prepare(minilm(), MethodContext(cfg, typed, batches)).info
    assert asked == [16] and info["calibration"]["examples"] == 16  # 2 × method.calibration_examples
    assert (seen["name"], seen["variant"], seen["mode"]) == ("grasp", "reference", "train")
    assert info["salience"] == {"metric": "grasp", "variant": "reference"}
    sizes = {n: 384 * 384 if n.endswith(("query", "key", "value", "attention.output.dense")) else 384 * 1536
             for n in info["density_per_layer"]}
    assert {n: round(d * sizes[n]) for n, d in info["density_per_layer"].items()} == dict.fromkeys(sizes, 9_216)
