"""SPSFT's tuner (methods/spsft/model.py) on MiniLM-L6: merge/export, detach, and the adapter file."""


import pytest
import torch
from safetensors.torch import save_file

from speft_bench.methods.speft.model import ADAPTER_FORMAT as SPEFT_FORMAT
from speft_bench.methods.speft.model import SPARSE_DELTAS
from speft_bench.methods.spsft.model import ADAPTER_FORMAT, ROW_DELTAS, AdapterError
from tests.helpers import prepare_method, with_base_logits

QUERY = "bert.encoder.layer.0.attention.self.query"


@pytest.fixture
def tuned(minilm):
    """MiniLM-L6 with 16 l2-chosen rows per target and random deltas, and a batch with its base logits."""
    model, batch, base_logits = with_base_logits(minilm())
    prepare_method(model, ["task=mrpc", "method=spsft", "metric=l2"], batch)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in ROW_DELTAS.layers(model).values():
            layer.delta.copy_(0.05 * torch.randn(layer.delta.shape, generator=gen))
        logits = model(**batch).logits
    assert (logits - base_logits).abs().max() > 1e-3  # the deltas matter
    return model, batch, base_logits, logits


@pytest.mark.slow
def test_merged_export_loads_in_plain_transformers(tuned, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, batch, _, logits = tuned
    restored = ROW_DELTAS.detach(model, merge=True)
    assert len(restored) == 36 and not ROW_DELTAS.layers(model)
    assert not any(".base." in key or key.endswith(".delta") for key in model.state_dict())
    model.save_pretrained(tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, logits, rtol=0, atol=1e-5)


def test_detach_without_merge_restores_the_pretrained_model(tuned):
    model, batch, base_logits, _ = tuned
    ROW_DELTAS.detach(model, merge=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base_logits, rtol=0, atol=0)


def test_adapter_round_trip_reproduces_logits(tuned, minilm, tmp_path):
    model, batch, _, logits = tuned
    path = tmp_path / "adapter.safetensors"
    metadata = {"model": "minilm_l6", "targets": ["all"], "metric": "l2", "r": 16}
    ROW_DELTAS.save(path, model, metadata)
    assert path.stat().st_size < 1.4e6  # 331 776 floats + rows: not the 22.7 M-parameter model

    fresh = minilm().eval()
    ROW_DELTAS.attach(fresh, {QUERY: torch.tensor([1, 2, 3])})  # attached layers are reset, not stacked
    assert ROW_DELTAS.load(path, fresh, model_id="minilm_l6", targets=["all"]) == metadata
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, logits, rtol=0, atol=1e-6)
    assert {n: m.rows.tolist() for n, m in ROW_DELTAS.layers(fresh).items()} == \
           {n: m.rows.tolist() for n, m in ROW_DELTAS.layers(model).items()}

    with pytest.raises(AdapterError, match="adapter was trained on model 'minilm_l6', not 'opt_125m'"):
        ROW_DELTAS.load(path, minilm(), model_id="opt_125m")
    with pytest.raises(AdapterError, match=r"adapter targets \['all'\], expected \['mlp'\]"):
        ROW_DELTAS.load(path, minilm(), targets=["mlp"])
    with pytest.raises(AdapterError, match="not a speft sparse-delta adapter .*'spsft-row-delta/2'"):
        SPARSE_DELTAS.load(path, minilm())  # the formats do not mix


def test_unsorted_rows_in_a_file_keep_their_delta_rows(minilm, tmp_path):
    path = tmp_path / "a.safetensors"
    delta = torch.arange(3 * 384, dtype=torch.float32).view(3, 384)
    save_file({f"{QUERY}.rows": torch.tensor([9, 2, 5]), f"{QUERY}.delta": delta}, str(path),
              metadata={"format": ADAPTER_FORMAT})
    model = minilm()
    ROW_DELTAS.load(path, model)
    layer = ROW_DELTAS.layers(model)[QUERY]
    assert layer.rows.tolist() == [2, 5, 9]
    assert torch.equal(layer.delta_dense()[[9, 2, 5]], delta)


GOOD = {f"{QUERY}.rows": torch.tensor([0, 5, 7]), f"{QUERY}.delta": torch.ones(3, 384)}
LAYER9 = "bert.encoder.layer.9.attention.self.query"


@pytest.mark.parametrize(("tensors", "metadata", "message"), [
    ({**GOOD, f"{QUERY}.rows": torch.tensor([0, 5, 384])}, None,
     rf"layer '{QUERY}': rows must lie in \[0, 384\), found \[0, 384\] \(its weight is \(384, 384\)\)"),
    ({**GOOD, f"{QUERY}.rows": torch.tensor([0, 5, 5])}, None, "rows contain duplicates"),
    ({**GOOD, f"{QUERY}.rows": torch.tensor([0.0, 5.0, 7.0])}, None,
     "rows must be a 1-D integer tensor, got torch.float32"),
    ({**GOOD, f"{QUERY}.rows": torch.tensor([[0, 5, 7]])}, None,
     r"rows must be a 1-D integer tensor, got torch.int64 of shape \(1, 3\)"),
    ({**GOOD, f"{QUERY}.delta": torch.ones(3, 383)}, None,
     r"delta must have shape \(rows, d_in\) = \(3, 384\), got \(3, 383\)"),
    ({**GOOD, f"{QUERY}.delta": torch.ones(4, 384)}, None,
     r"delta must have shape \(rows, d_in\) = \(3, 384\), got \(4, 384\)"),
    ({**GOOD, f"{QUERY}.delta": torch.ones(3, 384, dtype=torch.int64)}, None,
     "delta must be floating point, got torch.int64"),
    ({**GOOD, f"{QUERY}.delta": torch.ones(3, 384).index_fill(1, torch.tensor([4]), float("nan"))}, None,
     "delta contains NaN or inf"),
    ({**GOOD, f"{LAYER9}.rows": torch.tensor([1]), f"{LAYER9}.delta": torch.ones(1, 384)}, None,
     rf"layer '{LAYER9}' is not a linear layer of the model \(missing\)"),
    ({"bert.embeddings.LayerNorm.rows": torch.tensor([0]), "bert.embeddings.LayerNorm.delta": torch.ones(1, 384)}, None,
     r"layer 'bert.embeddings.LayerNorm' is not a linear layer of the model \(LayerNorm\); linear layers are "),
    ({f"{QUERY}.rows": GOOD[f"{QUERY}.rows"]}, None, f"layer '{QUERY}' has no delta tensor"),
    ({**GOOD, "classifier.weight": torch.ones(2, 384)}, None,
     r"unexpected tensor 'classifier.weight' \(expected '<layer>.rows' and '<layer>.delta'\)"),
    ({}, None, "adapter holds no layers"),
    (GOOD, {}, "not a spsft row-delta adapter"),
    (GOOD, {"format": SPEFT_FORMAT}, "not a spsft row-delta adapter .*format='speft-sparse-delta/2'"),
    (GOOD, {"format": ADAPTER_FORMAT, "model": "{not json"}, "metadata is not JSON-encoded"),
])
def test_bad_adapters_raise_adapter_error_and_change_nothing(minilm, tmp_path, tensors, metadata, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={"format": ADAPTER_FORMAT} if metadata is None else metadata)
    model = minilm()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(AdapterError, match=message):
        ROW_DELTAS.load(path, model)
    assert not ROW_DELTAS.layers(model)  # nothing half-applied (a good layer 0 comes before a bad layer 9)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_save_refuses_a_model_without_row_deltas_and_the_reserved_key(tuned, minilm, tmp_path):
    with pytest.raises(ValueError, match="the model has no RowDeltaLinear layers"):
        ROW_DELTAS.save(tmp_path / "a.safetensors", minilm(), {})
    with pytest.raises(ValueError, match="metadata key 'format' is reserved"):
        ROW_DELTAS.save(tmp_path / "a.safetensors", tuned[0], {"format": "mine"})
