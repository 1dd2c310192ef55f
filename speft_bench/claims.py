"""The papers' claims, tested on the run records: paired differences across seeds and tasks.

A claim (``conf/claims.yaml``) compares two rows of one table spec (``conf/tables/``), e.g. SPEFT's
Gradient row against LoRA's.  Its pairs are the (task, seed) runs both rows have completed: the
difference is ours(a) − ours(b) of the column's metric ×100, the same numbers the tables show.  A row
compared with several (``b: [...]``) gives one comparison each and a verdict over all of them.

The test is a paired t-test: mean difference, its two-sided ``confidence`` interval (Student t,
n − 1 degrees of freedom) and p-value against 0.  Pooling tasks assumes their differences share a
scale; they are all ×100 scores.  The verdict reads the interval against ``margin`` (points):

- ``equivalent`` (a ≈ b): reproduced when the interval lies inside (−margin, margin); not reproduced
  when it lies wholly outside it; otherwise undecided.
- ``not_worse`` (a ≥ b, "best or near best"): reproduced when the interval's low end is above
  −margin; not reproduced when its high end is below −margin; otherwise undecided.

Fewer than two pairs cannot be tested: undecided.  Over several comparisons: not reproduced when any
is, reproduced when all are, otherwise undecided.

An undecided comparison also says how many pairs would decide it if its mean and std stayed as measured
(``pairs_to_decide``): a planning figure for the sweeps, not a test.  A mean near the margin needs many.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from speft_bench.tables import TableSpec, cell_records, result_configs, runs_by_seed

REPRODUCED, NOT_REPRODUCED, UNDECIDED = "reproduced", "not reproduced", "undecided"
MOST_PAIRS = 1000  # pairs_to_decide looks no further (the protocol has 12 pairs a claim)
NAME = "claims"  # <out>/claims.{md,csv}, beside the tables (not a table: make_figures skips it)


def _equivalent(low: float, high: float, margin: float) -> str:
    if -margin < low and high < margin:
        return REPRODUCED
    return NOT_REPRODUCED if high <= -margin or low >= margin else UNDECIDED


def _not_worse(low: float, high: float, margin: float) -> str:
    if low > -margin:
        return REPRODUCED
    return NOT_REPRODUCED if high < -margin else UNDECIDED


VERDICTS: dict[str, Callable[[float, float, float], str]] = {"equivalent": _equivalent, "not_worse": _not_worse}
SYMBOLS = {"equivalent": "≈", "not_worse": "≥"}


@dataclass(frozen=True)
class Claim:
    """``a`` compared with each row of ``b`` in table ``table``, on the ``tasks`` columns (labels)."""

    label: str
    source: str  # where the paper says it
    table: str
    a: str
    b: tuple[str, ...]
    test: str
    tasks: tuple[str, ...]


def load_claims(path: Path) -> tuple[list[Claim], dict[str, Any]]:
    """The claims of ``path`` and its settings (``margin``, ``confidence``); ``tasks`` is each claim's default."""
    doc = yaml.safe_load(Path(path).read_text())
    settings = {"margin": float(doc["margin"]), "confidence": float(doc["confidence"])}
    if not (settings["margin"] >= 0 and 0 < settings["confidence"] < 1):
        raise ValueError(f"{path}: margin must be >= 0 and confidence in (0, 1); got {settings}")
    claims = []
    for c in doc["claims"]:
        b = c["b"] if isinstance(c["b"], list) else [c["b"]]
        claim = Claim(c["label"], c["source"], c["table"], c["a"], tuple(b), c["test"],
                      tuple(c.get("tasks", doc["tasks"])))
        if claim.test not in VERDICTS:
            raise ValueError(f"claim {claim.label!r}: test={claim.test!r}; allowed: {sorted(VERDICTS)}")
        claims.append(claim)
    return claims, settings


def seed_values(records: list[dict], metric: str) -> dict[Any, float]:
    """``{seed: metric×100}`` of the completed runs (`tables.runs_by_seed`)."""
    return {seed: 100 * r["metrics"][metric] for seed, r in runs_by_seed(records).items()
            if r.get("status") == "completed"}


def pairs(spec: TableSpec, records: Iterable[dict], a: str, b: str, tasks: tuple[str, ...]) -> pd.DataFrame:
    """One line per (task, seed) both rows completed: task, seed, a, b, diff = a − b (×100)."""
    rows = {r.label: r for r in spec.rows}
    columns = {c.label: c for c in spec.columns}
    unknown = sorted({a, b} - set(rows)) + sorted(set(tasks) - set(columns))
    if unknown:
        raise KeyError(f"table {spec.name} has no row/column {unknown}; rows {list(rows)}, columns {list(columns)}")
    flat = result_configs(spec, records)
    lines = []
    for task in tasks:
        col = columns[task]
        va = seed_values(cell_records(spec, rows[a], col, flat), col.metric)
        vb = seed_values(cell_records(spec, rows[b], col, flat), col.metric)
        lines += [{"task": task, "seed": s, "a": va[s], "b": vb[s], "diff": va[s] - vb[s]}
                  for s in sorted(set(va) & set(vb))]
    return pd.DataFrame(lines, columns=["task", "seed", "a", "b", "diff"])


def paired_test(diffs: pd.Series, confidence: float) -> dict[str, float]:
    """n, mean, std (ddof=1), the ``confidence`` interval of the mean and the two-sided p against 0."""
    n = len(diffs)
    if n < 2:
        return {"n": n, "mean": diffs.mean() if n else math.nan, "std": math.nan, "low": math.nan,
                "high": math.nan, "p": math.nan}
    mean, std = diffs.mean(), diffs.std(ddof=1)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    p = 1.0 if std == 0 and mean == 0 else (0.0 if std == 0
                                            else 2 * stats.t.sf(abs(mean) / (std / math.sqrt(n)), n - 1))
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half, "p": p}


def pairs_to_decide(mean: float, std: float, test: str, margin: float, confidence: float) -> int | None:
    """The fewest pairs (2 … ``MOST_PAIRS``) whose interval, at this ``mean`` and ``std``, gives ``test`` a
    verdict other than undecided; None when none does (or mean/std are unknown)."""
    if math.isnan(mean) or math.isnan(std):
        return None
    ns = np.arange(2, MOST_PAIRS + 1)
    halves = stats.t.ppf(0.5 + confidence / 2, ns - 1) * std / np.sqrt(ns)
    verdict = VERDICTS[test]
    return next((int(n) for n, h in zip(ns, halves) if verdict(mean - h, mean + h, margin) != UNDECIDED), None)


def evaluate(claims: list[Claim], specs: Iterable[TableSpec], records: list[dict], margin: float,
             confidence: float) -> pd.DataFrame:
    """One line per comparison: claim, comparison ("a ≈ b"), tasks, the test's numbers, verdict, and for
    an undecided one with n ≥ 2 the pairs that would decide it at its mean and std."""
    by_name = {s.name: s for s in specs}
    lines = []
    for claim in claims:
        for b in claim.b:
            diffs = pairs(by_name[claim.table], records, claim.a, b, claim.tasks)
            result = paired_test(diffs["diff"], confidence)
            verdict = UNDECIDED if result["n"] < 2 else VERDICTS[claim.test](result["low"], result["high"], margin)
            needed = (pairs_to_decide(result["mean"], result["std"], claim.test, margin, confidence)
                      if verdict == UNDECIDED else None)
            lines.append({"claim": claim.label, "source": claim.source, "test": claim.test,
                          "comparison": f"{claim.a} {SYMBOLS[claim.test]} {b}",
                          "tasks": ",".join(sorted(set(diffs.task), key=claim.tasks.index)),
                          "seeds": ",".join(str(s) for s in sorted(set(diffs.seed))), **result, "verdict": verdict,
                          "pairs_to_decide": needed})
    table = pd.DataFrame(lines)
    return table.astype({"pairs_to_decide": "Int64"}) if lines else table


def overall(verdicts: Iterable[str]) -> str:
    """A claim's verdict over its comparisons."""
    verdicts = set(verdicts)
    if NOT_REPRODUCED in verdicts:
        return NOT_REPRODUCED
    return REPRODUCED if verdicts == {REPRODUCED} else UNDECIDED


def _num(x: float, fmt: str = "+.2f") -> str:
    return "—" if math.isnan(x) else format(x, fmt)


def _pairs(verdict: str, n: int, needed) -> str:
    if verdict != UNDECIDED or n < 2:
        return "—"
    return f"> {MOST_PAIRS}" if pd.isna(needed) else str(needed)


def _ci(line) -> str:
    return "—" if math.isnan(line.low) else f"[{line.low:+.2f}, {line.high:+.2f}]"


def _in_brief(line) -> str:
    if line.n < 2:
        return f"{line.comparison}: {'no pairs' if line.n == 0 else '1 pair'}"
    needed = _pairs(line.verdict, line.n, line.pairs_to_decide)
    return f"{line.comparison} ({line.n}: {line.mean:+.2f} {_ci(line)}{'' if needed == '—' else '; ' + needed})"


def render_summary(table: pd.DataFrame, confidence: float) -> str:
    """Markdown: a line per claim with its verdict and, per comparison, n, mean [CI] and pairs to decide."""
    out = [f"| Claim | Verdict | Comparisons (n pairs: mean diff [{confidence:.0%} CI]; pairs to decide) |",
           "| :--- | :--- | :--- |"]
    for claim, group in table.groupby("claim", sort=False):
        brief = "; ".join(_in_brief(line) for line in group.itertuples())
        out.append(f"| {claim} | {overall(group.verdict)} | {brief} |")
    return "\n".join(out)


def render_md(table: pd.DataFrame, margin: float, confidence: float) -> str:
    """Markdown: the summary, then per claim its verdict and a line per comparison with the test's numbers."""
    out = [f"Paired differences ours(a) − ours(b), ×100, over the (task, seed) runs both rows completed; "
           f"{confidence:.0%} t-interval of the mean; margin ±{margin:g} points (speft_bench/claims.py). "
           f"Pairs to decide: how many pairs an undecided comparison would need if its mean and std stayed as "
           f"measured (> {MOST_PAIRS}: more than any sweep here).\n", render_summary(table, confidence), ""]
    for claim, group in table.groupby("claim", sort=False):
        out.append(f"**{claim}** ({group.source.iloc[0]}): **{overall(group.verdict)}**\n")
        out.append("| Comparison | Tasks | Seeds | n | Mean diff | Std | CI | p | Verdict | Pairs to decide |")
        out.append("| :--- | :--- | :--- | ---: | ---: | ---: | ---: | ---: | :--- | ---: |")
        for line in group.itertuples():
            out.append(f"| {line.comparison} | {line.tasks or '—'} | {line.seeds or '—'} | {line.n} "
                       f"| {_num(line.mean)} | {_num(line.std, '.2f')} | {_ci(line)} | {_num(line.p, '.3f')} "
                       f"| {line.verdict} | {_pairs(line.verdict, line.n, line.pairs_to_decide)} |")
        out.append("")
    return "\n".join(out)


def write_claims(path: Path, specs: Iterable[TableSpec], records: list[dict], out_dir: Path) -> list[Path]:
    """``out_dir/claims.{md,csv}`` from the claims at ``path``."""
    claims, settings = load_claims(path)
    table = evaluate(claims, specs, records, **settings)
    out_dir = Path(out_dir)
    written = [out_dir / f"{NAME}.md", out_dir / f"{NAME}.csv"]
    written[0].write_text("## The papers' claims on the CPU twins\n\n" + render_md(table, **settings))
    written[1].write_text(table.to_csv(index=False, float_format="%.4f"))
    return written
