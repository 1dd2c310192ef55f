"""SPEFT's tuner (methods/speft/model.py) on MiniLM-L6: attach, detach, merge, and the adapter file."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from speft_bench.methods.speft.model import ADAPTER_FORMAT, SPARSE_DELTAS, AdapterError
from speft_bench.models import target_linears
from tests.helpers import with_base_logits

KERNELS = ["dense", "sampled"]
# conf/targets/bert.yaml `all`: the 36 linears of MiniLM-L6's blocks
TARGETS = (r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
           r"|intermediate\.dense|output\.dense)")


def random_indices(model, per_layer=300, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(m.weight.numel(), generator=gen)[:per_layer]
            for name, m in target_linears(model, TARGETS).items()}


@pytest.fixture
def trained(minilm):
    """MiniLM-L6 with sparse deltas (300 random entries per target linear, random values), its base logits."""
    model, batch, base_logits = with_base_logits(minilm())
    layers = SPARSE_DELTAS.attach(model, random_indices(model))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in layers.values():
            layer.values.copy_(0.05 * torch.randn(layer.k, generator=gen))
    return model, batch, base_logits


def test_attach_replaces_linears_in_place_and_freezes_only_their_bases(trained, minilm):
    model, _, _ = trained
    layers = SPARSE_DELTAS.layers(model)
    assert len(layers) == 36 and all(layer.k == 300 for layer in layers.values())
    assert "bert.encoder.layer.0.attention.self.query.base.weight" in dict(model.named_parameters())
    assert not any(layer.base.weight.requires_grad for layer in layers.values())
    assert model.bert.embeddings.word_embeddings.weight.requires_grad  # the rest is the caller's business
    with pytest.raises(ValueError, match=r"'bert.embeddings.LayerNorm' is not an nn.Linear of the model \(LayerNorm\)"):
        SPARSE_DELTAS.attach(minilm(), {"bert.embeddings.LayerNorm": torch.tensor([0])})


def test_adapter_round_trip_reproduces_logits(trained, minilm, tmp_path):
    model, batch, base_logits = trained
    with torch.no_grad():
        logits = model(**batch).logits
    assert (logits - base_logits).abs().max() > 1e-3  # the deltas matter

    metadata = {"model": "minilm_l6", "targets": [TARGETS], "metric": "gradient", "budget": 36 * 300}
    SPARSE_DELTAS.save(tmp_path / "adapter.safetensors", model, metadata)
    fresh = minilm().eval()
    assert SPARSE_DELTAS.load(tmp_path / "adapter.safetensors", fresh, model_id="minilm_l6",
                              targets=[TARGETS]) == metadata

    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, logits)
    assert {n: layer.indices.tolist() for n, layer in SPARSE_DELTAS.layers(fresh).items()} == \
           {n: layer.indices.tolist() for n, layer in SPARSE_DELTAS.layers(model).items()}

    with pytest.raises(AdapterError, match="adapter was trained on model 'minilm_l6', not 'opt_125m'"):
        SPARSE_DELTAS.load(tmp_path / "adapter.safetensors", minilm(), model_id="opt_125m")
    with pytest.raises(AdapterError, match=r"adapter targets \['\.\*"):
        SPARSE_DELTAS.load(tmp_path / "adapter.safetensors", minilm(), targets=["query", "value"])


@pytest.mark.slow
def test_merged_export_loads_in_plain_transformers(trained, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, batch, base_logits = trained
    with torch.no_grad():
        logits = model(**batch).logits
    restored = SPARSE_DELTAS.detach(model, merge=True)
    assert len(restored) == 36 and not SPARSE_DELTAS.layers(model)
    assert not any(".base." in key for key in model.state_dict())
    model.save_pretrained(tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, logits, rtol=0, atol=1e-5)


def test_detach_without_merge_restores_the_pretrained_model(trained):
    model, batch, base_logits = trained
    next(iter(SPARSE_DELTAS.layers(model).values())).merge()  # a pending merge is undone too
    SPARSE_DELTAS.detach(model, merge=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base_logits, rtol=0, atol=0)


def test_save_refuses_a_pending_merge_and_keeps_a_refresh_merged_into_the_base(trained, tmp_path):
    model, _, _ = trained
    layer = SPARSE_DELTAS.layers(model)["bert.encoder.layer.0.attention.self.query"]
    old = layer.indices.long().clone()
    layer.merge()
    with pytest.raises(ValueError, match="layer 'bert.encoder.layer.0.attention.self.query' has its delta merged"):
        SPARSE_DELTAS.save(tmp_path / "a.safetensors", model, {})
    layer.set_mask(torch.tensor([0, 1]))  # as a dynamic-mask refresh does: the merge is permanent
    assert torch.equal(layer.base_touched, old)
    SPARSE_DELTAS.save(tmp_path / "a.safetensors", model, {})
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor(f"{QUERY}.base_indices"), old)
        assert torch.equal(f.get_tensor(f"{QUERY}.base_weight"), layer.base.weight.view(-1)[old])


QUERY = "bert.encoder.layer.0.attention.self.query"  # a 384 × 384 weight
GOOD = {f"{QUERY}.indices": torch.tensor([0, 5, 7], dtype=torch.int32), f"{QUERY}.values": torch.ones(3)}


@pytest.mark.parametrize(("tensors", "metadata", "message"), [
    ({**GOOD, f"{QUERY}.indices": torch.tensor([0, 5, 147456], dtype=torch.int32)}, None,
     rf"layer '{QUERY}': indices must lie in \[0, 147456\) for its weight \(384, 384\), found \[0, 147456\]"),
    ({f"bert.encoder.layer.9.attention.self.query.{k.rsplit('.', 1)[1]}": v for k, v in GOOD.items()}, None,
     r"layer 'bert.encoder.layer.9.attention.self.query' is not a linear layer of the model \(missing\)"),
    ({"bert.embeddings.LayerNorm.indices": GOOD[f"{QUERY}.indices"], "bert.embeddings.LayerNorm.values": torch.ones(3)},
     None, r"layer 'bert.embeddings.LayerNorm' is not a linear layer of the model \(LayerNorm\)"),
    ({**GOOD, f"{QUERY}.values": torch.ones(4)}, None,
     r"indices \(3,\) and values \(4,\) must be 1-D of the same length"),
    ({**GOOD, f"{QUERY}.indices": torch.tensor([0.0, 5.0, 7.0])}, None,
     "indices must be integers, got torch.float32"),
    ({**GOOD, f"{QUERY}.values": torch.ones(3, dtype=torch.int64)}, None,
     "values must be floating point, got torch.int64"),
    ({**GOOD, f"{QUERY}.indices": torch.tensor([0, 5, 5])}, None, "indices contain duplicates"),
    ({**GOOD, f"{QUERY}.values": torch.tensor([0.0, float("nan"), 1.0])}, None, "values contain NaN or inf"),
    ({f"{QUERY}.indices": GOOD[f"{QUERY}.indices"]}, None, f"layer '{QUERY}' has no values tensor"),
    ({**GOOD, "classifier.weight": torch.ones(2, 384)}, None, "unexpected tensor 'classifier.weight'"),
    (GOOD, {}, "not a speft sparse-delta adapter"),
    (GOOD, {"format": ADAPTER_FORMAT, "model": "{not json"}, "metadata is not JSON-encoded"),
])
def test_bad_adapters_raise_adapter_error_naming_the_problem(minilm, tmp_path, tensors, metadata, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={"format": ADAPTER_FORMAT} if metadata is None else metadata)
    model = minilm()
    with pytest.raises(AdapterError, match=message):
        SPARSE_DELTAS.load(path, model)
    assert not SPARSE_DELTAS.layers(model)  # nothing half-applied
