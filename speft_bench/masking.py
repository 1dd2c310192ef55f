"""Sparse masks from salience scores: budgets, exact top-k (global or per layer), mask statistics.

A mask is ``{layer name: sorted flat indices (int64) into that layer's (d_out, d_in) weight}``.

Top-k never sorts or concatenates all scores: the k-th largest score is found by bisection over
order-preserving int32 keys of the float32 scores (≤ 32 counting passes, one layer at a time), so
ranking a 7B model needs no copy of its scores.  Ties at the threshold go to the lowest positions
in layer order, so a mask is a deterministic function of the scores.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

Shapes = dict[str, tuple[int, int]]  # layer name -> (d_out, d_in)
Mask = dict[str, Tensor]


def lora_param_count(shapes: Shapes, r: int) -> int:
    """LoRA's trainable count at rank r on these layers: Σ r·(d_in + d_out)."""
    return sum(r * (d_out + d_in) for d_out, d_in in shapes.values())


def budget_from_density(shapes: Shapes, density: float) -> int:
    """round(density · number of target weights), at least 1."""
    return max(1, round(density * sum(a * b for a, b in shapes.values())))


def sort_keys(scores: Tensor) -> Tensor:
    """int32 keys in the order of the float32 scores (IEEE bits, negatives' low 31 bits flipped)."""
    bits = scores.detach().float().reshape(-1).view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _count_at_least(scores: dict[str, Tensor], key: int) -> int:
    return sum(int((sort_keys(s) >= key).sum()) for s in scores.values())


def top_k(scores: dict[str, Tensor], k: int) -> Mask:
    """The k highest scores over all layers together, ties broken by position (layer order, flat index)."""
    total = sum(s.numel() for s in scores.values())
    if not 0 < k <= total:
        raise ValueError(f"budget k={k} must be in [1, {total}] (the number of target weights)")
    # largest key t with count(key >= t) >= k: that is the k-th largest score
    lo = min(int(sort_keys(s).min()) for s in scores.values())
    hi = max(int(sort_keys(s).max()) for s in scores.values())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count_at_least(scores, mid) >= k:
            lo = mid
        else:
            hi = mid - 1
    mask, ties_left = {}, k - sum(int((sort_keys(s) > lo).sum()) for s in scores.values())
    for name, s in scores.items():
        keys = sort_keys(s)
        ties = torch.nonzero(keys == lo).squeeze(1)[:ties_left]
        ties_left -= len(ties)
        mask[name] = torch.cat([torch.nonzero(keys > lo).squeeze(1), ties]).sort().values
    return mask


def local_budgets(shapes: Shapes, k: int) -> dict[str, int]:
    """k split in proportion to layer size (largest remainders, ties by layer order): sums to k exactly."""
    sizes = {name: a * b for name, (a, b) in shapes.items()}
    total = sum(sizes.values())
    exact = {name: k * n / total for name, n in sizes.items()}
    budgets = {name: int(q) for name, q in exact.items()}
    by_remainder = sorted(exact, key=lambda name: -(exact[name] - budgets[name]))  # stable: layer order
    for name in by_remainder[: k - sum(budgets.values())]:
        budgets[name] += 1
    return budgets


def equal_budgets(shapes: Shapes, k: int) -> dict[str, int]:
    """k / n to each of the n layers, whatever their size (the authors' code with an integer k): ⌊k/n⌋
    each and one more to each of the first k mod n layers, so the shares sum to k exactly.

    ValueError, naming ``masking.local_split``, when a layer has fewer weights than its share.
    """
    base, extra = divmod(k, len(shapes))
    budgets = {name: base + (i < extra) for i, name in enumerate(shapes)}
    small = [f"{name} ({a * b:,})" for name, (a, b) in shapes.items() if budgets[name] > a * b]
    if small:
        raise ValueError(f"masking.local_split=equal gives each of the {len(shapes)} layers {base:,}+ of the k={k:,} "
                         f"entries, more than the weights of {', '.join(small)}; use masking.local_split=proportional "
                         f"or a smaller budget")
    return budgets


LOCAL_SPLITS = {"proportional": local_budgets, "equal": equal_budgets}  # masking.local_split -> shares of k


def top_k_global(scores: dict[str, Tensor], k: int) -> Mask:
    """One ranking over all target weights."""
    return top_k(scores, k)


def top_k_local(scores: dict[str, Tensor], k: int, split: str = "proportional") -> Mask:
    """Each layer ranks its own weights and keeps its share of k (``split``: ``LOCAL_SPLITS``)."""
    budgets = LOCAL_SPLITS[split]({n: tuple(s.shape) for n, s in scores.items()}, k)
    return {name: top_k({name: s}, budgets[name])[name] if budgets[name] else torch.empty(0, dtype=torch.int64)
            for name, s in scores.items()}


SELECTORS = {"global": top_k_global, "local": top_k_local}  # masking.scope -> selector


def select_mask(scores: dict[str, Tensor], k: int, scope: str, local_split: str = "proportional") -> Mask:
    """The mask of ``masking.scope`` (a local one shares k as ``masking.local_split`` says)."""
    return top_k_local(scores, k, local_split) if scope == "local" else top_k_global(scores, k)


def density_per_layer(mask: Mask, shapes: Shapes) -> dict[str, float]:
    return {name: len(idx) / (shapes[name][0] * shapes[name][1]) for name, idx in mask.items()}


def mask_overlap(a: Mask, b: Mask) -> float:
    """|A ∩ B| / |A|: the fraction of the entries of mask ``a`` that ``b`` keeps (equal-size masks)."""
    kept = sum(int(torch.isin(a[name], b[name]).sum()) for name in a)
    return kept / max(1, sum(len(idx) for idx in a.values()))


def mask_digest(mask: Mask) -> str:
    """sha256 of the layer names and their sorted indices: equal digests, equal masks (recorded per run)."""
    digest = hashlib.sha256()
    for name in sorted(mask):
        digest.update(name.encode())
        digest.update(mask[name].to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]
