"""Each salience metric against a brute-force computation of its formula on a tiny network."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speft_bench.errors import NonFiniteError
from speft_bench.salience import SALIENCE_METRICS, compute_salience



class Tiny(nn.Module):
    """4 → 5 → 3 classifier (tanh, dropout) in float64, called like a transformers model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.drop, self.fc2 = nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3)
        self.double()

    def forward(self, x, labels):
        logits = self.fc2(self.drop(self.act(self.fc1(x))))
        return SimpleNamespace(loss=F.cross_entropy(logits, labels), logits=logits)


@pytest.fixture
def setup():
    model = Tiny().train()  # the metrics must switch dropout off themselves
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (10,), generator=gen)
    batches = [{"x": x[a:b], "labels": y[a:b]} for a, b in [(0, 4), (4, 8), (8, 10)]]  # uneven sizes
    weights = {"fc1": model.fc1.weight, "fc2": model.fc2.weight}
    return model, weights, batches, x, y


def per_example_grads(model, weights, x, y):
    """Explicit loop: ∂ℓ_i/∂θ for each of the examples, in eval mode."""
    model.eval()
    grads = []
    for i in range(len(y)):
        loss = F.cross_entropy(model.fc2(model.act(model.fc1(x[i:i + 1]))), y[i:i + 1])
        grads.append(dict(zip(weights, torch.autograd.grad(loss, list(weights.values())))))
    model.train()
    return grads


def mean_of(grads, name):
    return torch.stack([g[name] for g in grads]).mean(0)


FIRST_ORDER = {
    "magnitude": lambda g, w: w.abs(),
    "gradient": lambda g, w: g.abs(),
    "snip": lambda g, w: (g * w).abs(),
    "force": lambda g, w: -g * w,
    "taylor_fo": lambda g, w: (g * w) ** 2,
}


@pytest.mark.parametrize("metric", list(FIRST_ORDER))
def test_first_order_metrics_equal_their_formula(setup, metric):
    model, weights, batches, x, y = setup
    grads = per_example_grads(model, weights, x, y)
    scores = compute_salience(metric, model, weights, batches)
    for name, w in weights.items():
        expected = FIRST_ORDER[metric](mean_of(grads, name), w.detach())
        torch.testing.assert_close(scores[name], expected, rtol=0, atol=1e-12)
    assert model.training and all(p.requires_grad for p in model.parameters())  # flags restored


def test_fisher_is_the_mean_of_per_example_squared_gradients(setup):
    model, weights, batches, x, y = setup
    grads = per_example_grads(model, weights, x, y)
    exact = compute_salience("fisher", model, weights, batches)
    for name in weights:
        expected = torch.stack([g[name] ** 2 for g in grads]).mean(0)
        torch.testing.assert_close(exact[name], expected, rtol=0, atol=1e-12)
        assert not torch.allclose(exact[name], mean_of(grads, name) ** 2)  # not the square of the mean
    # micro-batches of 2: the mean over pairs of the squared pair-mean gradient
    approx = compute_salience("fisher", model, weights, batches, micro_batch=2)
    pairs = [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    for name in weights:
        expected = torch.stack([torch.stack([grads[i][name] for i in range(a, b)]).mean(0) ** 2 for a, b in pairs]).mean(0)
        torch.testing.assert_close(approx[name], expected, rtol=0, atol=1e-12)


def test_grasp_equals_minus_explicit_hessian_times_gradient_times_weight(setup):
    model, weights, batches, x, y = setup
    model.eval()
    shapes = {n: w.shape for n, w in weights.items()}
    theta = torch.cat([w.detach().reshape(-1) for w in weights.values()])

    def mean_loss(flat):
        w1, w2 = flat[:20].view(shapes["fc1"]), flat[20:].view(shapes["fc2"])
        h = torch.tanh(F.linear(x, w1, model.fc1.bias.detach()))
        return F.cross_entropy(F.linear(h, w2, model.fc2.bias.detach()), y)

    hessian = torch.autograd.functional.hessian(mean_loss, theta)  # explicit 35 × 35
    grad = torch.autograd.functional.jacobian(mean_loss, theta)
    expected = -(hessian @ grad) * theta
    model.train()
    scores = compute_salience("grasp", model, weights, batches)
    torch.testing.assert_close(torch.cat([scores["fc1"].reshape(-1), scores["fc2"].reshape(-1)]), expected,
                               rtol=0, atol=1e-12)


def test_synflow_equals_the_path_product_on_a_linear_chain():
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(4, 6, bias=False), nn.GELU(), nn.Linear(6, 5, bias=False), nn.LayerNorm(5),
                          nn.ReLU(), nn.Linear(5, 3, bias=False))
    w1, w2, w3 = (chain[i].weight for i in (0, 2, 5))
    before = [p.detach().clone() for p in chain.parameters()]
    scores = compute_salience("synflow", chain, {"w1": w1, "w2": w2, "w3": w3}, batches=[])
    a1, a2, a3 = (w.detach().double().abs() for w in (w1, w2, w3))
    ones = lambda n: torch.ones(n, dtype=torch.float64)  # noqa: E731
    # R = 1ᵀ|W3||W2||W1|1; ∂R/∂|W_l| = (1ᵀ|W_L|…|W_l+1|)ᵀ (|W_l-1|…|W_1| 1)ᵀ; score = |W_l| ⊙ that
    expected = {
        "w1": a1 * torch.outer(ones(3) @ a3 @ a2, ones(4)),
        "w2": a2 * torch.outer(ones(3) @ a3, a1 @ ones(4)),
        "w3": a3 * torch.outer(ones(3), a2 @ a1 @ ones(4)),
    }
    top = max(float(e.max()) for e in expected.values())  # one global scale: rankings unchanged
    for name in expected:
        torch.testing.assert_close(scores[name].double(), expected[name] / top, rtol=1e-6, atol=0)
        assert scores[name].dtype == torch.float32
    assert all(torch.equal(p, q) for p, q in zip(chain.parameters(), before))  # model untouched
    assert isinstance(chain[3], nn.LayerNorm) and isinstance(chain[1], nn.GELU)


def test_synflow_and_grasp_run_on_a_real_transformer(minilm):
    """Overflow-prone SynFlow (6 blocks of |θ|) and GRaSP's double backward through attention."""
    model = minilm()
    weights = {f"v{i}": model.bert.encoder.layer[i].attention.self.value.weight for i in (0, 5)}
    batch = {"input_ids": torch.randint(1000, 2000, (2, 12), generator=torch.Generator().manual_seed(0)),
             "labels": torch.tensor([0, 1])}
    for metric in ("synflow", "grasp"):
        scores = compute_salience(metric, model, weights, [batch])
        assert all(s.shape == (384, 384) and torch.isfinite(s).all() and s.abs().max() > 0 for s in scores.values())
    assert float(max(s.max() for s in compute_salience("synflow", model, weights, []).values())) == 1.0


def test_non_finite_salience_stops_naming_the_layer(setup):
    model, weights, batches, _, _ = setup
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite salience gradient of fc"):
        compute_salience("gradient", model, weights, batches)


def test_all_eight_metrics_are_registered():
    assert SALIENCE_METRICS.names() == ["fisher", "force", "gradient", "grasp", "magnitude", "snip", "synflow", "taylor_fo"]
