"""Each salience metric against a brute-force computation of its formula on a tiny network; the same
masks as before the memory work on MiniLM-L6 + MRPC; micro-batching, offload, in-place SynFlow and
peak memory."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speft_bench.errors import NonFiniteError
from speft_bench.masking import lora_param_count, top_k_global
from speft_bench.salience import SALIENCE_METRICS
from speft_bench.salience.base import compute_salience, score_buffers
from speft_bench.salience.memory import LiveBytes
from tests.helpers import MINILM, ROOT, compose_config


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
        expected = torch.stack([torch.stack([grads[i][name] for i in range(a, b)]).mean(0) ** 2
                                for a, b in pairs]).mean(0)
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


@pytest.mark.slow
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
    assert SALIENCE_METRICS.names() == ["fisher", "force", "gradient", "grasp", "magnitude", "snip", "synflow",
                                        "taylor_fo"]



# --- the memory work changed no score: MiniLM-L6 + real MRPC, fp32 -----------------------------------

# The masks of the code before the memory work (commit 2ad0b72: before micro-batches, float32 buffers,
# per-layer gradients and the copy-free SynFlow; its scores were compared with today's bit for bit). Each
# mask is held as a fingerprint, not a digest: float32 sums round differently per CPU, so entries next to
# the k-th score swap between machines (three CPUs seen, three digests for SNIP). Scores × (1 + 1e-5·noise)
# move a fingerprint by ≤ 16 entries; two different metrics' masks are ≥ 60,000 apart.
FINGERPRINTS = json.loads((Path(__file__).parent / "mask_fingerprints.json").read_text())
MAX_MOVED = 200


def row_block_counts(mask: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], rows: int) -> list[int]:
    """Selected entries per block of ``rows`` rows of each layer, layers in name order."""
    counts = []
    for name in sorted(mask):
        d_out, d_in = shapes[name]
        counts += torch.bincount(mask[name] // (d_in * rows), minlength=-(-d_out // rows)).tolist()
    return counts


@pytest.fixture(scope="module")
def mrpc(minilm):
    """MiniLM-L6 (2 labels), its 36 target weights, and the first 16 MRPC training examples tokenized to ≤ 48."""
    from transformers import DataCollatorWithPadding

    from speft_bench.config import validate
    from speft_bench.data.glue import TokenizedSplit, load_glue
    from speft_bench.models import load_tokenizer, package_path, targets_for

    typed = validate(compose_config("task=mrpc", "method=speft", "metric=gradient", "task.train_limit=16"))
    tokenizer = load_tokenizer(str(package_path(MINILM)), typed["model"])
    split = TokenizedSplit(load_glue(typed["task"], ROOT.parent / "shared" / "data")["train"], tokenizer, 48)
    collate = DataCollatorWithPadding(tokenizer)
    model = minilm()
    weights = {n: m.weight for n, m in targets_for(model, typed["model"], typed["method"].targets).items()}
    return SimpleNamespace(model=model, weights=weights, collate=lambda rows: collate([split[i] for i in rows]))


@pytest.mark.slow
@pytest.mark.parametrize("metric", sorted(FINGERPRINTS["metrics"]))
def test_masks_are_the_ones_of_the_code_before(mrpc, metric):
    batches = [mrpc.collate(range(a, b)) for a, b in [(0, 4), (4, 8), (8, 10)]]
    scores = compute_salience(metric, mrpc.model, mrpc.weights, batches)
    shapes = {n: tuple(w.shape) for n, w in mrpc.weights.items()}
    k = lora_param_count(shapes, 8)
    assert k == 331_776
    reference = FINGERPRINTS["metrics"][metric]
    counts = row_block_counts(top_k_global(scores, k), shapes, FINGERPRINTS["rows_per_block"])
    assert len(counts) == len(reference["rows_per_32"]) and sum(counts) == k
    assert sum(abs(a - b) for a, b in zip(counts, reference["rows_per_32"])) <= MAX_MOVED
    every = torch.cat([s.flatten() for s in scores.values()])
    assert float(every.kthvalue(every.numel() - k + 1).values) == pytest.approx(reference["kth_score"], rel=1e-4)


def test_a_mask_fingerprint_counts_entries_per_block_of_rows():
    mask = {"b": torch.tensor([0, 5, 39]), "a": torch.tensor([4 * 3 + 1])}  # b: 10 x 4, a: 5 x 3
    assert row_block_counts(mask, {"a": (5, 3), "b": (10, 4)}, rows=4) == [0, 1, 2, 0, 1]


@pytest.mark.slow
@pytest.mark.parametrize(("metric", "options"), [("gradient", {}), ("grasp", {}), ("fisher", {"micro_batch": 8})])
def test_micro_batches_of_4_equal_the_whole_batch_of_16_on_glue(mrpc, metric, options):
    batch = mrpc.collate(range(16))
    whole = compute_salience(metric, mrpc.model, mrpc.weights, [batch], **options)
    micro = compute_salience(metric, mrpc.model, mrpc.weights, [batch], **options, calibration_micro_batch=4)
    for name in whole:
        scale = float(whole[name].abs().max())
        torch.testing.assert_close(micro[name], whole[name], rtol=1e-4, atol=1e-5 * scale)
    if metric == "fisher":  # pieces of 8 examples, not of 4: squaring 4-example gradients would differ
        fours = compute_salience(metric, mrpc.model, mrpc.weights, [batch], micro_batch=4)
        assert not all(torch.allclose(fours[n], whole[n], rtol=1e-2) for n in whole)


# --- causal LM: the mean over response tokens, however the set is split --------------------------------

def tiny_causal_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    return model, {n: m.weight for n, m in model.named_modules() if n.endswith("_proj")}


def instruct_batch(n=16, length=10):
    """n examples with prompts of 1…8 tokens, right padding, and examples 4–7 without any response token."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 48, (n, length), generator=gen)
    prompt = torch.randint(1, 9, (n,), generator=gen)
    real = length - torch.randint(0, 3, (n,), generator=gen)
    pos = torch.arange(length)
    labels = ids.masked_fill((pos < prompt[:, None]) | (pos >= real[:, None]), -100)
    labels[4:8] = -100
    return {"input_ids": ids, "attention_mask": (pos < real[:, None]).long(), "labels": labels}


def test_micro_batches_weigh_by_response_tokens_on_a_causal_lm():
    model, weights = tiny_causal_lm()
    batch = instruct_batch()
    terms = (batch["labels"][:, 1:] != -100).sum(dim=1)
    assert len(set(terms.tolist())) > 3 and terms[4:8].sum() == 0  # uneven, and one micro-batch without any
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_sum = F.cross_entropy(logits[:, :-1].reshape(-1, 48), batch["labels"][:, 1:].reshape(-1), reduction="sum")
    per_token = dict(zip(weights, torch.autograd.grad(token_sum / terms.sum(), list(weights.values()))))
    first, second = ({k: v[a:b] for k, v in batch.items()} for a, b in [(0, 10), (10, 16)])
    for batches, micro in [([batch], None), ([batch], 4), ([first, second], None), ([first, second], 3)]:
        scores = compute_salience("gradient", model, weights, batches, calibration_micro_batch=micro)
        for name, g in per_token.items():
            torch.testing.assert_close(scores[name], g.abs(), rtol=1e-4, atol=1e-6)
    # weighting the two batches' mean losses by their examples (the old rule) is another, wrong, mean
    by_examples = [torch.autograd.grad(model(**b).loss * (len(b["labels"]) / 16), list(weights.values()))
                   for b in (first, second)]
    wrong = {name: (a + b).abs() for name, a, b in zip(weights, *by_examples)}
    assert not all(torch.allclose(wrong[n], per_token[n].abs(), rtol=1e-2) for n in weights)


# --- SynFlow works on the model in place and gives it back bit for bit ------------------------------------

def bits(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter as same-width integers: equal bits, equal lists (unlike ==, which has −0.0 == 0.0)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return [p.detach().view(ints[p.element_size()]).clone() for p in model.parameters()]


@pytest.mark.slow
def test_synflow_restores_every_parameter_bit_for_bit(minilm):
    model = minilm()
    with torch.no_grad():  # signed zeros, whose sign |θ| drops and a careless restore would not put back
        model.bert.encoder.layer[0].attention.self.value.weight[0, :5] = -0.0
        model.bert.embeddings.position_embeddings.weight[3, :5] = -0.0
    before = bits(model)
    modules = [type(m) for m in model.modules()]
    weights = {f"v{i}": model.bert.encoder.layer[i].attention.self.value.weight for i in (0, 5)}
    compute_salience("synflow", model, weights, [])
    assert all(torch.equal(a, b) for a, b in zip(bits(model), before))
    assert [type(m) for m in model.modules()] == modules  # norms, activations and linears swapped back
    with torch.no_grad():
        model.bert.encoder.layer[2].output.dense.weight[1, 1] = -float("nan")
    before = bits(model)
    with pytest.raises(NonFiniteError):
        compute_salience("synflow", model, weights, [])
    assert all(torch.equal(a, b) for a, b in zip(bits(model), before))  # restored on the way out too


# --- options: float32 (at least) scores, on the CPU with offload -------------------------------------------

def test_score_buffers_follow_offload_and_are_at_least_float32():
    weights = {"a": torch.empty(3, 4, dtype=torch.bfloat16, device="meta"),
               "b": torch.empty(2, 2, dtype=torch.float64)}
    kept, offloaded = score_buffers(weights), score_buffers(weights, offload=True)
    assert (kept["a"].device.type, kept["a"].dtype, kept["b"].dtype) == ("meta", torch.float32, torch.float64)
    assert offloaded["a"].device.type == "cpu" and offloaded["a"].dtype == torch.float32
    assert all(s.shape == w.shape and not s.any() for s, w in zip(offloaded.values(), weights.values()))


@pytest.mark.parametrize("metric", SALIENCE_METRICS.names())
def test_bf16_weights_get_float32_scores_with_every_option(metric):
    model, weights, batches = deep(torch.bfloat16)
    for offload in (False, True):
        scores = compute_salience(metric, model, weights, batches, calibration_micro_batch=1, offload=offload)
        assert all(s.dtype == torch.float32 and s.device.type == "cpu" and s.shape == w.shape
                   for s, w in zip(scores.values(), weights.values()))


# --- peak memory, counted allocation by allocation ---------------------------------------------------------

class Deep(nn.Module):
    """32 linears 128 → 128 (ReLU between), fp32: one layer is 1/32 of the weights, activations ~2 %."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(*[m for _ in range(32) for m in (nn.Linear(128, 128), nn.ReLU())][:-1])

    def forward(self, x, labels=None):
        logits = self.layers(x)
        return SimpleNamespace(loss=F.cross_entropy(logits, labels) if labels is not None else None, logits=logits)


def deep(dtype=torch.float32):
    """``Deep`` in ``dtype``, its 32 weights, and two calibration batches of 2 examples."""
    model = Deep().to(dtype)
    gen = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(2, 128, generator=gen).to(dtype), "labels": torch.randint(0, 128, (2,), generator=gen)}
               for _ in range(2)]
    return model, {f"l{i}": m.weight for i, m in enumerate(model.layers) if isinstance(m, nn.Linear)}, batches


# peak over W, the weights' size, one example per micro-batch: the issue's budgets, but GRaSP's 2.2 W.  Its
# double backward reaches each weight twice, through the forward linear and through that linear's
# backward, far apart in the graph, and autograd holds the first contribution until the second: up to W
# of partial sums on top of E[g] and H·E[g] (splitting them would change the sums, and so the scores).
# The code before: 1.0, 2.03 (first order), 3.0 (Fisher), 4.08 (GRaSP), 7.08 (SynFlow) on this network.
BUDGETS = {"magnitude": 1.05, "gradient": 1.1, "snip": 1.1, "force": 1.1, "taylor_fo": 1.1, "fisher": 1.2,
           "grasp": 3.1, "synflow": 1.2}


@pytest.mark.parametrize("metric", sorted(BUDGETS))
def test_peak_memory_stays_within_the_budget(metric):
    model, weights, batches = deep()
    w_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    counter = LiveBytes()
    with counter:
        scores = compute_salience(metric, model, weights, batches, calibration_micro_batch=1)
    assert counter.peak >= w_bytes  # the probe sees the score buffers themselves
    assert counter.peak <= BUDGETS[metric] * w_bytes, f"{metric}: {counter.peak / w_bytes:.3f} × W"
    del scores


# --- metric.variant=reference: the authors' code (0-ml/speft), each against its own definition ----------

def test_grasp_reference_is_plus_the_next_sets_hessian_times_the_first_sets_gradient_at_temperature_200(setup):
    from speft_bench.salience.base import calibration_sets

    model, weights, batches, x, y = setup
    model.eval()
    shapes = {n: w.shape for n, w in weights.items()}
    theta = torch.cat([w.detach().reshape(-1) for w in weights.values()])

    def mean_loss(flat, xs, ys, temperature):
        w1, w2 = flat[:20].view(shapes["fc1"]), flat[20:].view(shapes["fc2"])
        h = torch.tanh(F.linear(xs, w1, model.fc1.bias.detach()))
        return F.cross_entropy(F.linear(h, w2, model.fc2.bias.detach()) / temperature, ys)

    # the calibration draw holds two sets: g on examples 0-4, H on the next ones, 5-9 (batch 4:8 is cut)
    grad = torch.autograd.functional.jacobian(lambda t: mean_loss(t, x[:5], y[:5], 200.0), theta)
    hessian = torch.autograd.functional.hessian(lambda t: mean_loss(t, x[5:], y[5:], 200.0), theta)
    expected = (hessian @ grad) * theta
    model.train()
    scores = compute_salience("grasp", model, weights, batches, variant="reference")
    got = torch.cat([scores["fc1"].reshape(-1), scores["fc2"].reshape(-1)])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-20)
    assert F.cross_entropy.__name__ == "cross_entropy"  # the temperature is gone again
    paper = compute_salience("grasp", model, weights, batches)  # −, T = 1, one set: another ranking
    assert not torch.allclose(torch.cat([paper["fc1"].reshape(-1), paper["fc2"].reshape(-1)]).sign(), got.sign())
    assert calibration_sets("grasp", variant="reference") == 2
    assert calibration_sets("grasp", variant="paper") == calibration_sets("fisher", variant="reference") == 1


class Shift(nn.Module):
    """x + b with a persistent buffer b: the authors' |·| of the state dict reaches buffers too."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("b", torch.linspace(-1.0, 0.5, n))

    def forward(self, x):
        return x + self.b


def test_synflow_reference_is_the_authors_abs_state_dict_flow_through_the_unchanged_modules():
    from transformers.activations import GELUActivation

    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(4, 6), GELUActivation(), nn.Linear(6, 5), nn.LayerNorm(5), nn.ReLU(), Shift(5),
                          nn.Linear(5, 3)).double()  # float64: runs in the model's dtype, so exact here
    with torch.no_grad():  # signed norm parameters, so that |γ|, |β| matter
        chain[3].weight.copy_(torch.tensor([1.5, -0.5, 0.8, -1.2, 0.3]))
        chain[3].bias.copy_(torch.tensor([-0.2, 0.4, -0.6, 0.1, 0.0]))
    weights = {"w1": chain[0].weight, "w2": chain[2].weight, "w3": chain[6].weight}
    before = bits(chain) + [chain[5].b.clone()]
    relu = F.relu
    scores = compute_salience("synflow", chain, weights, [], variant="reference")

    def flow(bypass_relu: bool):
        """R = Σ out of the |state dict| chain on an all-ones input; F.relu (nn.ReLU) bypassed, transformers'
        GELUActivation (bound at construction) and LayerNorm kept; score |∂R/∂|θ| · |θ||."""
        a = {n: p.detach().double().abs().requires_grad_(n.endswith("weight") and n[0] in "026")
             for n, p in chain.named_parameters()}
        h = torch.ones(1, 4, dtype=torch.float64)  # no float64 cast of a float32 model, no 16-token input
        h = F.gelu(F.linear(h, a["0.weight"], a["0.bias"]))
        h = F.layer_norm(F.linear(h, a["2.weight"], a["2.bias"]), (5,), a["3.weight"], a["3.bias"])
        h = (h if bypass_relu else F.relu(h)) + chain[5].b.abs()
        total = F.linear(h, a["6.weight"], a["6.bias"]).sum()
        ws = [a["0.weight"], a["2.weight"], a["6.weight"]]
        return {n: (g * w).abs() for n, g, w in zip(weights, torch.autograd.grad(total, ws), ws)}

    expected = flow(bypass_relu=True)
    for name in weights:
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-12, atol=0)
    assert not torch.allclose(scores["w1"], flow(bypass_relu=False)["w1"], rtol=1e-3)  # the bypass matters
    after = bits(chain) + [chain[5].b]
    assert all(torch.equal(p, q) for p, q in zip(after, before)) and F.relu is relu  # all put back


def tiny_bert():
    """A 1-block BERT classifier (hidden 8, 2 token types, 2 labels) in float64 and two batches with
    segment ids, padding and dropout."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=12, max_position_embeddings=16, type_vocab_size=2, num_labels=2)
    model = BertForSequenceClassification(config).double().train()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 20, (6, 5), generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1]] * 3 + [[1, 1, 1, 0, 0]] * 3)
    segments = torch.tensor([[0, 0, 1, 1, 1]] * 6) * mask
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    batch = {"input_ids": ids, "token_type_ids": segments, "attention_mask": mask, "labels": labels}
    batches = [{k: v[a:b] for k, v in batch.items()} for a, b in [(0, 4), (4, 6)]]
    weights = {f"l0.{n}": m.weight for n, m in model.bert.encoder.layer[0].named_modules() if isinstance(m, nn.Linear)}
    return model, weights, batches, batch


def test_fisher_reference_puts_the_labels_into_token_type_ids_one_example_at_a_time():
    model, weights, batches, batch = tiny_bert()
    scores = compute_salience("fisher", model, weights, batches, variant="reference")
    model.eval()
    squares = {name: torch.zeros_like(w) for name, w in weights.items()}
    for i in range(6):  # keyword call: token type = the example's label at every position; the usual loss
        row = {k: v[i:i + 1] for k, v in batch.items()}
        logits = model(input_ids=row["input_ids"], attention_mask=row["attention_mask"],
                       token_type_ids=row["labels"].expand(1, 5)).logits
        grads = torch.autograd.grad(F.cross_entropy(logits, row["labels"]), list(weights.values()))
        for name, g in zip(weights, grads):
            squares[name] += g ** 2 / 6
    for name in weights:
        torch.testing.assert_close(scores[name], squares[name], rtol=1e-10, atol=1e-16)
    paper = compute_salience("fisher", model, weights, batches)  # the batch's segment ids: another Fisher
    assert not all(torch.allclose(paper[n], scores[n], rtol=1e-3, atol=0) for n in weights)


def test_fisher_reference_refuses_what_the_authors_call_cannot_do(setup):
    from speft_bench.errors import ConfigError

    model, weights, batches, _ = tiny_bert()
    three = [{**b, "labels": b["labels"] * 2} for b in batches]  # label 2: no such token type
    with pytest.raises(ConfigError, match="type_vocab_size=2 and the labels go up to 2"):
        compute_salience("fisher", model, weights, three, variant="reference")
    tiny, tiny_weights, tiny_batches, _, _ = setup  # forward(x, labels): no third parameter
    with pytest.raises(ConfigError, match="token_type_ids on BERT-family models; Tiny.forward takes"):
        compute_salience("fisher", tiny, tiny_weights, tiny_batches, variant="reference")


def test_calibration_mode_train_keeps_dropout_on(setup):
    model, weights, batches, x, y = setup
    torch.manual_seed(5)
    scores = compute_salience("gradient", model, weights, batches, mode="train")
    assert model.training
    torch.manual_seed(5)  # the same dropout masks: one forward per batch, in order
    loss = sum(model(b["x"], b["labels"]).loss * len(b["labels"]) / 10 for b in batches)
    for name, g in zip(weights, torch.autograd.grad(loss, list(weights.values()))):
        torch.testing.assert_close(scores[name], g.abs(), rtol=0, atol=1e-12)
    evaluated = compute_salience("gradient", model, weights, batches)
    assert not torch.allclose(evaluated["fc1"], scores["fc1"])
    model.eval()
    compute_salience("gradient", model, weights, batches, mode="train")
    assert not model.training  # the caller's mode comes back


def test_split_examples_cuts_into_equal_consecutive_sets():
    from speft_bench.salience.base import split_examples

    batches = [{"labels": torch.arange(a, b)} for a, b in [(0, 4), (4, 8), (8, 10)]]
    sets = split_examples(batches, 2)
    assert [[b["labels"].tolist() for b in s] for s in sets] == [[[0, 1, 2, 3], [4]], [[5, 6, 7], [8, 9]]]
    assert sets[0][0] is batches[0]  # whole batches are not copied


@pytest.mark.parametrize("metric", ["grasp", "synflow"])
def test_reference_variants_stay_within_the_paper_variants_budgets(metric):
    model, weights, batches = deep()
    w_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    counter = LiveBytes()
    with counter:
        scores = compute_salience(metric, model, weights, batches, variant="reference", calibration_micro_batch=1)
    assert w_bytes <= counter.peak <= BUDGETS[metric] * w_bytes, f"{metric}: {counter.peak / w_bytes:.3f} × W"
    del scores
