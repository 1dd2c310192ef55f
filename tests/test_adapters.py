"""The adapter file format both sparse tuners share (speft_bench/adapters.py): unreadable files fail
with an AdapterError naming the file, and a good file still loads afterwards."""

import pytest
import torch
from safetensors.torch import save_file

from speft_bench.adapters import AdapterError
from speft_bench.methods.speft.model import SPARSE_DELTAS
from speft_bench.methods.spsft.model import ROW_DELTAS

QUERY = "bert.encoder.layer.0.attention.self.query"  # a 384 × 384 weight
TUNERS = {  # tuner, a good 3-entry (3-row) adapter for QUERY, the attached size it must give
    "speft": (SPARSE_DELTAS, {f"{QUERY}.indices": torch.tensor([0, 5, 7], dtype=torch.int32),
                              f"{QUERY}.values": torch.ones(3)},
              lambda model: SPARSE_DELTAS.layers(model)[QUERY].k),
    "spsft": (ROW_DELTAS, {f"{QUERY}.rows": torch.tensor([0, 5, 7]), f"{QUERY}.delta": torch.ones(3, 384)},
              lambda model: ROW_DELTAS.layers(model)[QUERY].r),
}


@pytest.mark.parametrize("kind", TUNERS)
def test_unreadable_adapter_files_raise_adapter_error(minilm, tmp_path, kind):
    tuner, tensors, attached_size = TUNERS[kind]
    model = minilm()
    good = tmp_path / "good.safetensors"
    save_file(tensors, str(good), metadata={"format": tuner.format})
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01this is not a safetensors file" * 10)
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[:-5])
    for name in ["garbage", "truncated"]:
        with pytest.raises(AdapterError, match=rf"{name}.safetensors: not a readable safetensors file"):
            tuner.load(tmp_path / f"{name}.safetensors", model)
    with pytest.raises(AdapterError, match="no such adapter file"):
        tuner.load(tmp_path / "missing.safetensors", model)
    assert tuner.load(good, model) == {} and attached_size(model) == 3
