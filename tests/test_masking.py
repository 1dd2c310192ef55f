"""Masks: exact top-k against brute force, deterministic ties, local shares, LoRA-matched budgets."""

import pytest
import torch

from speft_bench.masking import (
    SELECTORS,
    budget_from_density,
    density_per_layer,
    local_budgets,
    lora_param_count,
    mask_overlap,
    sort_keys,
    top_k,
)

# MiniLM-L6's 36 target linears: per block q, k, v, attention.output (384×384), intermediate (1536×384),
# output (384×1536)
MINILM = {f"{b}.{n}": s for b in range(6) for n, s in
          [("q", (384, 384)), ("k", (384, 384)), ("v", (384, 384)), ("o", (384, 384)), ("up", (1536, 384)),
           ("down", (384, 1536))]}


def test_lora_matched_budget_is_the_issue_count():
    assert lora_param_count(MINILM, 8) == 331_776
    assert budget_from_density(MINILM, 0.01) == round(0.01 * 6 * (4 * 384 * 384 + 2 * 1536 * 384))


def test_sort_keys_preserve_float_order_including_signs_zero_and_inf():
    values = torch.tensor([-float("inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 2.0000002, float("inf")])
    keys = sort_keys(values)
    assert torch.all(keys[1:] >= keys[:-1]) and keys.dtype == torch.int32
    assert torch.equal(sort_keys(values[torch.randperm(9)]).sort().values, keys)


@pytest.mark.parametrize("signed", [False, True])
def test_global_top_k_equals_brute_force(signed):
    gen = torch.Generator().manual_seed(0)
    scores = {"a": torch.randn(7, 5, generator=gen), "b": torch.randn(3, 11, generator=gen),
              "c": torch.randn(4, 4, generator=gen)}

    if not signed:
        scores = {n: s.abs() for n, s in scores.items()}
    for k in [1, 13, 50, 84]:
        mask = top_k(scores, k)
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        offsets = {"a": 0, "b": 35, "c": 68}
        chosen = torch.cat([idx + offsets[n] for n, idx in mask.items()])
        assert sorted(chosen.tolist()) == sorted(flat.topk(k).indices.tolist())
        assert all(torch.equal(idx, idx.unique()) for idx in mask.values())  # sorted, unique


def test_ties_go_to_the_lowest_positions_in_layer_order():
    scores = {"a": torch.ones(2, 3), "b": torch.ones(2, 2), "c": torch.full((1, 2), 5.0)}
    mask = top_k(scores, 6)
    assert {n: idx.tolist() for n, idx in mask.items()} == {"a": [0, 1, 2, 3], "b": [], "c": [0, 1]}
    assert {n: idx.tolist() for n, idx in top_k(scores, 8).items()} == {"a": [0, 1, 2, 3, 4, 5], "b": [], "c": [0, 1]}


def test_local_budgets_are_proportional_to_size_and_sum_to_k():
    assert local_budgets({"a": (2, 5), "b": (4, 5), "c": (5, 6)}, 7) == {"a": 1, "b": 2, "c": 4}
    budgets = local_budgets(MINILM, 331_776)
    assert sum(budgets.values()) == 331_776
    assert budgets["0.up"] == 4 * budgets["0.q"] == 4 * 331_776 // 72  # 147,456 vs 589,824 weights


def test_local_selection_ranks_each_layer_separately():
    scores = {"small": torch.arange(10.0).view(2, 5), "big": 100 + torch.arange(30.0).view(5, 6)}
    local = SELECTORS["local"](scores, 8)  # shares 2 and 6
    assert local["small"].tolist() == [8, 9] and local["big"].tolist() == list(range(24, 30))
    glob = SELECTORS["global"](scores, 8)  # the big layer's scores all beat the small one's
    assert glob["small"].tolist() == [] and glob["big"].tolist() == list(range(22, 30))
    assert density_per_layer(local, {"small": (2, 5), "big": (5, 6)}) == {"small": 0.2, "big": 0.2}


def test_overlap_and_bad_budgets():
    a = {"x": torch.tensor([0, 1, 2, 3])}
    assert mask_overlap(a, {"x": torch.tensor([2, 3, 4, 5])}) == 0.5 and mask_overlap(a, a) == 1.0
    with pytest.raises(ValueError, match=r"budget k=13 must be in \[1, 12\]"):
        top_k({"x": torch.ones(3, 4)}, 13)


def test_equal_budgets_give_every_layer_k_over_n_and_sum_to_k():
    from speft_bench.masking import equal_budgets

    assert equal_budgets({"a": (2, 5), "b": (4, 5), "c": (5, 6)}, 7) == {"a": 3, "b": 2, "c": 2}  # 7 = 2·3 + 1
    assert set(equal_budgets(MINILM, 331_776).values()) == {9_216}  # the authors' k / 36, exactly
    with pytest.raises(ValueError, match=r"masking.local_split=equal gives each of the 2 layers 5\+ .* a \(2\)"):
        equal_budgets({"a": (1, 2), "b": (10, 10)}, 10)


def test_equal_local_selection_is_each_layers_own_top_share():
    gen = torch.Generator().manual_seed(3)
    scores = {"small": torch.randn(2, 5, generator=gen), "big": torch.randn(5, 6, generator=gen)}
    mask = SELECTORS["local"](scores, 9, split="equal")  # 5 and 4, whatever the sizes
    for name, share in [("small", 5), ("big", 4)]:
        assert mask[name].tolist() == sorted(scores[name].reshape(-1).topk(share).indices.tolist())
    assert SELECTORS["local"](scores, 9)["small"].numel() == 2  # proportional: 9 · 10/40 → 2
