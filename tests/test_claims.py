"""The claims' paired tests on hand-built records: pairs, t-interval, p and verdicts against scipy and by hand."""

import math

import pandas as pd
import pytest
from scipy import stats

from speft_bench.claims import (
    NOT_REPRODUCED,
    REPRODUCED,
    UNDECIDED,
    VERDICTS,
    Claim,
    evaluate,
    load_claims,
    overall,
    paired_test,
    pairs,
    pairs_to_decide,
    render_md,
    render_summary,
)
from speft_bench.tables import TABLES_CONF, Column, Row, TableSpec, load_specs


def record(method, task, seed, score, status="completed"):
    metric = {"mrpc": "accuracy", "stsb": "pearson"}[task]
    return {"status": status, "run_dir": f"{method}/{task}/{seed}",
            "config": {"model": {"name": "m"}, "task": {"name": task}, "method": {"name": method},
                       "train": {"seed": seed}},
            "metrics": {metric: score} if status == "completed" else {}}


SPEC = TableSpec(name="toy", title="Toy", model="m",
                 columns=(Column("MRPC", "mrpc", "accuracy"), Column("STS-B", "stsb", "pearson")),
                 rows=(Row("A", {"method.name": "a"}), Row("B", {"method.name": "b"})))
RECORDS = [
    record("a", "mrpc", 0, 0.80), record("b", "mrpc", 0, 0.78),
    record("a", "mrpc", 1, 0.10), record("a", "mrpc", 1, 0.82),  # a later record of a seed replaces the earlier
    record("b", "mrpc", 1, 0.81),
    record("a", "mrpc", 2, 0.90), record("b", "mrpc", 2, 0.0, status="failed"),  # not a pair
    record("a", "stsb", 0, 0.70), record("b", "stsb", 0, 0.705),
    record("a", "stsb", 1, 0.60), record("b", "stsb", 1, 0.5, status="interrupted"),  # still to finish
]


def test_pairs_are_the_task_seeds_both_rows_completed():
    got = pairs(SPEC, RECORDS, "A", "B", ("MRPC", "STS-B"))
    assert list(zip(got.task, got.seed)) == [("MRPC", 0), ("MRPC", 1), ("STS-B", 0)]
    assert got["diff"].tolist() == pytest.approx([2.0, 1.0, -0.5])


def test_pairs_name_an_unknown_row_or_column():
    with pytest.raises(KeyError, match=r"no row/column \['C', 'RTE'\]"):
        pairs(SPEC, RECORDS, "A", "C", ("RTE",))


def test_paired_test_matches_scipy_and_the_t_interval_by_hand():
    a, b = pd.Series([80.0, 82.0, 70.0, 75.5]), pd.Series([78.0, 81.0, 70.5, 73.0])
    got = paired_test(a - b, 0.95)
    d = (a - b).to_numpy()
    half = 3.182446305284263 * d.std(ddof=1) / 2  # t_{0.975, 3} · s / √4
    assert got["n"] == 4 and got["mean"] == pytest.approx(d.mean())
    assert (got["low"], got["high"]) == (pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
    assert got["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)


def test_one_pair_cannot_be_tested():
    got = paired_test(pd.Series([1.5]), 0.95)
    assert got["n"] == 1 and got["mean"] == 1.5 and math.isnan(got["low"]) and math.isnan(got["p"])


@pytest.mark.parametrize("test, diffs, verdict", [
    ("equivalent", [0.1, -0.1, 0.2, 0.0], REPRODUCED),      # CI inside ±1
    ("equivalent", [5.0, 5.2, 4.9, 5.1], NOT_REPRODUCED),   # CI wholly above +1
    ("equivalent", [3.0, -2.0, 1.0, 0.5], UNDECIDED),       # CI straddles the margin
    ("not_worse", [-0.5, -0.4, -0.6, -0.5], REPRODUCED),    # worse, but by less than the margin
    ("not_worse", [-5.0, -5.2, -4.9, -5.1], NOT_REPRODUCED),
    ("not_worse", [3.0, -4.0, 1.0, 0.5], UNDECIDED),
])
def test_verdict_reads_the_interval_against_the_margin(test, diffs, verdict):
    records = [r for i, d in enumerate(diffs)
               for r in (record("a", "mrpc", i, 0.5 + d / 100), record("b", "mrpc", i, 0.5))]

    claim = Claim("c", "toy", "toy", "A", ("B",), test, ("MRPC",))
    got = evaluate([claim], [SPEC], records, margin=1.0, confidence=0.95)
    assert got.verdict.tolist() == [verdict] and got.n.tolist() == [4]


def sample(n, mean, std):
    """n differences with exactly this mean and std (ddof=1)."""
    z = pd.Series(range(n), dtype=float)
    return mean + std * (z - z.mean()) / z.std(ddof=1)


@pytest.mark.parametrize("test, mean, std", [
    ("equivalent", 0.0, 1.0), ("equivalent", 0.6, 3.2), ("equivalent", 1.8, 2.0), ("equivalent", -1.3, 4.0),
    ("not_worse", -0.4, 2.5), ("not_worse", 1.5, 9.0), ("not_worse", -2.5, 3.0),
])
def test_pairs_to_decide_is_the_first_n_whose_interval_decides(test, mean, std):
    """Brute force: at the n it gives, n such pairs get a verdict; at n − 1 they are still undecided."""
    n = pairs_to_decide(mean, std, test, 1.0, 0.95)
    verdict = {m: VERDICTS[test](r["low"], r["high"], 1.0) for m in (n - 1, n) if m >= 2
               for r in [paired_test(sample(m, mean, std), 0.95)]}
    assert verdict[n] != UNDECIDED and verdict.get(n - 1, UNDECIDED) == UNDECIDED


def test_pairs_to_decide_by_hand_and_where_no_n_decides():
    assert pairs_to_decide(0.0, 1.0, "equivalent", 1.0, 0.95) == 7  # t_{.975,6}/√7 = 0.925 < 1 < t_{.975,5}/√6
    assert pairs_to_decide(1.0, 2.0, "equivalent", 1.0, 0.95) is None  # a mean on the margin: never
    assert pairs_to_decide(0.5, 100.0, "equivalent", 1.0, 0.95) is None  # beyond MOST_PAIRS
    assert pairs_to_decide(math.nan, math.nan, "not_worse", 1.0, 0.95) is None


def test_only_an_undecided_comparison_gets_pairs_to_decide():
    records = [r for i, d in enumerate([3.0, -2.0, 1.0, 0.5, 5.0, 5.2, 4.9, 5.1])
               for r in (record("a", "mrpc" if i < 4 else "stsb", i, 0.5 + d / 100),
                         record("b", "mrpc" if i < 4 else "stsb", i, 0.5))]
    claims = [Claim(t, "toy", "toy", "A", ("B",), "equivalent", (t,)) for t in ("MRPC", "STS-B")]
    got = evaluate(claims, [SPEC], records, margin=1.0, confidence=0.95)
    assert got.verdict.tolist() == [UNDECIDED, NOT_REPRODUCED]
    assert got.pairs_to_decide.tolist()[0] == pairs_to_decide(0.625, got["std"][0], "equivalent", 1.0, 0.95)
    assert pd.isna(got.pairs_to_decide[1])
    assert f"| undecided | {got.pairs_to_decide[0]} |" in render_md(got, 1.0, 0.95)


def test_the_summary_gives_each_claim_a_line_with_its_numbers():
    diffs = {"mrpc": [3.0, -2.0, 1.0, 0.6], "stsb": [5.0, 5.2, 4.9, 5.1]}
    records = [r for task, ds in diffs.items() for seed, d in enumerate(ds)
               for r in (record("a", task, seed, 0.5 + d / 100), record("b", task, seed, 0.5))]
    claims = [Claim(t, "toy", "toy", "A", ("B",), "equivalent", (t,)) for t in ("MRPC", "STS-B")]
    got = evaluate(claims, [SPEC], records, margin=1.0, confidence=0.95)
    # by hand: MRPC mean 0.65, std 2.0551, half-width t(0.975, 3) 3.1824 × 2.0551 / 2 = 3.2701;
    # STS-B mean 5.05, std 0.1291, half-width 0.2054
    assert render_summary(got, 0.95).splitlines() == [
        "| Claim | Verdict | Comparisons (n pairs: mean diff [95% CI]; pairs to decide) |",
        "| :--- | :--- | :--- |",
        f"| MRPC | undecided | A ≈ B (4: +0.65 [-2.62, +3.92]; {got.pairs_to_decide[0]}) |",
        "| STS-B | not reproduced | A ≈ B (4: +5.05 [+4.84, +5.26]) |"]
    assert render_summary(got, 0.95) in render_md(got, 1.0, 0.95)
    none = evaluate(claims[:1], [SPEC], [], margin=1.0, confidence=0.95)
    assert render_summary(none, 0.95).splitlines()[2] == "| MRPC | undecided | A ≈ B: no pairs |"


def test_a_claim_over_several_comparisons():
    assert overall([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert overall([REPRODUCED, UNDECIDED]) == UNDECIDED
    assert overall([UNDECIDED, NOT_REPRODUCED, REPRODUCED]) == NOT_REPRODUCED


def test_the_shipped_claims_name_rows_and_columns_of_the_shipped_tables():
    claims, settings = load_claims(TABLES_CONF.parent / "claims.yaml")
    specs = {s.name: s for s in load_specs()}
    assert settings == {"margin": 1.0, "confidence": 0.95} and len(claims) == 10
    for claim in claims:
        spec = specs[claim.table]
        assert {claim.a, *claim.b} <= {r.label for r in spec.rows}, claim.label
        assert set(claim.tasks) <= {c.label for c in spec.columns}, claim.label
    table = evaluate(claims, specs.values(), [], **settings)  # no records: every claim undecided, none fails
    assert set(table.verdict) == {UNDECIDED} and "**undecided**" in render_md(table, **settings)


@pytest.mark.parametrize("settings", ["margin: -1.0\nconfidence: 0.95", "margin: 1.0\nconfidence: 95"])
def test_bad_claim_settings_name_the_keys(tmp_path, settings):
    path = tmp_path / "claims.yaml"
    path.write_text(settings + "\ntasks: [MRPC]\nclaims: []\n")
    with pytest.raises(ValueError, match=r"margin must be >= 0 and confidence in \(0, 1\)"):
        load_claims(path)
