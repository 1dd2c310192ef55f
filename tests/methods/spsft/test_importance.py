"""SPSFT's row importance (methods/spsft/importance.py): ℓ2, Taylor and QM-Taylor against brute force
on a tiny network, quantile means by hand, top rows, split by label."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speft_bench.errors import NonFiniteError
from speft_bench.methods.spsft.importance import (
    IMPORTANCE,
    neuron_importance,
    quantile_mean,
    split_by_label,
    top_rows,
)

# --- importance on a tiny network, against brute force ---------------------------------------------

class TinyNet(nn.Module):
    """4 → 5 → 3 classifier with dropout (importance must be computed in eval mode)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(4, 5, dtype=torch.float64), nn.Linear(5, 3, dtype=torch.float64)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, labels):
        logits = self.fc2(self.drop(torch.tanh(self.fc1(x))))
        return SimpleNamespace(loss=F.cross_entropy(logits, labels), logits=logits)


def tiny_batches():
    """Two uneven batches (4 + 3 examples) over 3 labels."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 0, 2, 2, 1])
    return [{"x": x[:4], "labels": labels[:4]}, {"x": x[4:], "labels": labels[4:]}]


def brute_taylor(model, examples) -> dict[str, list[float]]:
    """Per row i: Σ_j |(1/n Σ_x ∂ℓ(x)/∂w_ij) · w_ij|, one example at a time, with explicit loops."""
    model.eval()
    out = {}
    for name in ("fc1", "fc2"):
        w = model.get_submodule(name).weight
        mean = torch.zeros_like(w)
        for x, label in examples:
            (g,) = torch.autograd.grad(model(x[None], label[None]).loss, w)
            mean += g / len(examples)
        out[name] = [sum(abs(mean[i, j].item() * w[i, j].item()) for j in range(w.shape[1])) for i in range(w.shape[0])]
    return out


def hand_quantile_mean(values: list[float], levels: int = 11) -> float:
    """Mean of the k/(levels-1) quantiles, linear interpolation between the sorted values."""
    v, total = sorted(values), 0.0
    for k in range(levels):
        pos = k / (levels - 1) * (len(v) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(v) - 1)
        total += v[lo] + (pos - lo) * (v[hi] - v[lo])
    return total / levels


def examples_of(batches, label=None):
    return [(b["x"][i], b["labels"][i]) for b in batches for i in range(len(b["labels"]))
            if label is None or b["labels"][i] == label]


def weights_of(model):
    return {"fc1": model.fc1.weight, "fc2": model.fc2.weight}


def test_registered_metrics():
    assert IMPORTANCE.names() == ["l2", "qm_taylor", "taylor"]
    assert [IMPORTANCE[n].needs_data for n in ("l2", "taylor", "qm_taylor")] == [False, True, True]
    assert [IMPORTANCE[n].classification_only for n in ("l2", "taylor", "qm_taylor")] == [False, False, True]


def test_l2_is_the_norm_of_each_output_row():
    model = TinyNet()
    scores = neuron_importance("l2", model, weights_of(model), [])
    for name, w in weights_of(model).items():
        expected = [math.sqrt(sum(w[i, j].item() ** 2 for j in range(w.shape[1]))) for i in range(w.shape[0])]
        assert scores[name].tolist() == pytest.approx(expected, rel=1e-12)


def test_taylor_matches_per_example_brute_force():
    model, batches = TinyNet(), tiny_batches()
    scores = neuron_importance("taylor", model.train(), weights_of(model), batches)
    expected = brute_taylor(model, examples_of(batches))
    for name in expected:
        assert scores[name].tolist() == pytest.approx(expected[name], rel=1e-10)
    assert all(s.min() > 0 for s in scores.values())


def test_qm_taylor_is_the_quantile_mean_of_per_label_taylor_scores():
    model, batches = TinyNet(), tiny_batches()
    scores = neuron_importance("qm_taylor", model, weights_of(model), batches)
    per_label = [brute_taylor(model, examples_of(batches, label)) for label in (0, 1, 2)]
    for name in ("fc1", "fc2"):
        expected = [hand_quantile_mean([t[name][i] for t in per_label]) for i in range(len(per_label[0][name]))]
        assert scores[name].tolist() == pytest.approx(expected, rel=1e-10)
        mean = [sum(t[name][i] for t in per_label) / 3 for i in range(len(expected))]
        assert scores[name].tolist() != pytest.approx(mean, rel=1e-3)  # 3 labels: not just the mean


@pytest.mark.parametrize("metric", ["taylor", "qm_taylor"])
def test_micro_batches_give_the_same_importance(metric):
    model, batches = TinyNet(), tiny_batches()
    whole = neuron_importance(metric, model, weights_of(model), batches)
    for micro in (1, 3):
        split = neuron_importance(metric, model, weights_of(model), batches, calibration_micro_batch=micro)
        for name in whole:
            torch.testing.assert_close(split[name], whole[name], rtol=1e-12, atol=0)


def test_quantile_mean_by_hand():
    # levels 0, .1, …, 1 over [0, 1, 5] sit at positions 0, .2, …, 2 of the sorted values:
    # 0 .2 .4 .6 .8 1 | 1.8 2.6 3.4 4.2 5  → sum 20 → 20/11 (the mean would be 2, the median 1)
    scores = torch.tensor([[5.0, 2.0], [0.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
    assert quantile_mean(scores).tolist() == pytest.approx([20 / 11, 2.0], rel=1e-12)
    # two labels: the quantiles are evenly spread between them, so the mean of the two
    assert quantile_mean(torch.tensor([[1.0], [4.0]])).item() == pytest.approx(2.5)
    assert quantile_mean(scores, levels=2).tolist() == pytest.approx([2.5, 2.0])  # (min + max) / 2


def test_split_by_label_keeps_every_field_of_the_selected_rows():
    batches = tiny_batches()
    groups = split_by_label(batches)
    assert list(groups) == [0, 1, 2]
    assert [[len(b["labels"]) for b in groups[label]] for label in groups] == [[2], [1, 1], [1, 2]]
    assert torch.equal(groups[2][1]["x"], batches[1]["x"][[0, 1]])


def test_top_rows_takes_the_highest_and_breaks_ties_by_lower_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.5])
    assert top_rows(scores, 2).tolist() == [1, 2]
    assert top_rows(scores, 4).tolist() == [1, 2, 3, 4]
    assert top_rows(scores, 4).dtype == torch.int64
    with pytest.raises(ValueError, match="cannot select 7 rows out of 6"):
        top_rows(scores, 7)


def test_non_finite_importance_names_the_layer():
    model = TinyNet()
    with torch.no_grad():
        model.fc2.weight[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite importance l2 of fc2"):
        neuron_importance("l2", model, weights_of(model), [])
