"""Run records → the papers' tables, with the published numbers beside ours.

A *record* is the JSON dict ``run.py`` writes; a `TableSpec` (one YAML per table in ``conf/tables/``)
says which records fill which cell and which published row sits beside each of our rows; the
published numbers are the long-format CSVs in ``results/paper/``. Everything is a pure function of
records, specs and the paper frame, except `load_records`, `load_paper`, `load_specs` and
`write_tables`, which read or write files.

Cell convention: mean ± sample std (ddof=1) over seeds of the column's metric ×100, two decimals;
one seed → no ±. A cell with a failed run reads "failed" (never a number), a cell without runs "—".
Bold = best of the column on the shown two decimals (ties all bold); "#" counts the task columns a
row is best in (not Avg.). "Avg." is the mean over the task columns when every one is a number, its
± the mean of their stds (SPEFT Table 1's convention); the paper's Avg. is the mean of the paper's
numbers over the same columns, so both averages cover the same tasks.

A record of a random-init model (``model.init=random``: benchmarks and shape checks) is never a
result: `build_table` skips it with a warning naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
import yaml

from speft_bench import PROJECT_ROOT
from speft_bench.records import HASHED_AT_DEFAULT, RECORD_NAME

TABLES_CONF = PROJECT_ROOT / "conf" / "tables"
PAPER_DIR = PROJECT_ROOT / "results" / "paper"
AVG, WINS, MISSING, FAILED = "Avg.", "#", "—", "failed"
# Config keys the seeds of one cell may differ in; any other difference is a second setting.
PER_RUN_KEYS = ("train.seed", "train.log_every", "train.num_threads", "train.eval_batch_size", "paths.", "logger.",
                *(f"{group}.{knob}" for group, knob in HASHED_AT_DEFAULT))


@dataclass(frozen=True)
class Column:
    """A task column: ``metric`` of the ``task`` runs, beside the paper's column ``paper`` (None: not in the paper)."""

    label: str
    task: str
    metric: str
    paper: str | None = None


@dataclass(frozen=True)
class PaperRow:
    """A published row: ``row`` of ``model`` in ``results/paper/<table>.csv``."""

    table: str
    model: str
    row: str


@dataclass(frozen=True)
class Row:
    """A method row: the records whose config has every ``select`` value (dotted path → value)."""

    label: str
    select: dict[str, Any]
    paper: PaperRow | None = None


@dataclass(frozen=True)
class TableSpec:
    """One table: ``rows`` × ``columns`` of ``model``'s runs; ``reference`` says what the paper block is."""

    name: str
    title: str
    model: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    reference: str = ""


def _make(cls, values: dict[str, Any], where: str):
    """``cls(**values)``, failing with the unknown keys and the allowed ones."""
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {allowed}")
    return cls(**values)


def spec_from_dict(d: dict[str, Any]) -> TableSpec:
    """A spec from its YAML form; the spec-level ``paper: {table, model}`` is the default of each row's ``paper``."""
    d = dict(d)
    name = d.get("name", "?")
    default = d.pop("paper", None) or {}

    def paper_row(ref: str | dict | None) -> PaperRow | None:
        if ref is None:
            return None
        ref = {"row": ref} if isinstance(ref, str) else ref
        return _make(PaperRow, default | ref, f"table {name}: paper of a row")

    columns = tuple(_make(Column, c, f"table {name}: column") for c in d.pop("columns"))
    rows = tuple(_make(Row, r | {"paper": paper_row(r.get("paper"))}, f"table {name}: row") for r in d.pop("rows"))
    return _make(TableSpec, d | {"columns": columns, "rows": rows}, f"table {name}")


def load_specs(folder: Path = TABLES_CONF) -> list[TableSpec]:
    return [spec_from_dict(yaml.safe_load(p.read_text())) for p in sorted(Path(folder).glob("*.yaml"))]


def load_paper(folder: Path = PAPER_DIR) -> pd.DataFrame:
    """Every ``results/paper/*.csv`` in one frame, with ``table_id`` = the file's stem."""
    frames = [pd.read_csv(p, dtype=str, keep_default_na=False).assign(table_id=p.stem)
              for p in sorted(Path(folder).glob("*.csv"))]
    paper = pd.concat(frames, ignore_index=True)
    return paper.assign(value=pd.to_numeric(paper["value"]))


def paper_value(paper: pd.DataFrame, ref: PaperRow | None, column: str | None) -> float:
    """The published number at (ref, column); NaN when either is None; KeyError when the paper has no such cell."""
    if ref is None or column is None:
        return math.nan
    hit = paper[(paper.table_id == ref.table) & (paper.model == ref.model) & (paper.row == ref.row)
                & (paper.column == column)]
    if len(hit) != 1:
        rows = sorted(set(paper[(paper.table_id == ref.table) & (paper.model == ref.model)].row))
        raise KeyError(f"{ref} has {len(hit)} cells in column {column!r}; rows of that table and model: {rows}")
    return float(hit.value.iloc[0])


def load_records(root: Path) -> list[dict[str, Any]]:
    """Every readable ``record.json`` under ``root``, oldest first (run directories are named by start time)."""
    records = []
    for path in sorted(Path(root).rglob(RECORD_NAME), key=lambda p: (p.parent.name, str(p))):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            warnings.warn(f"skipping {path}: {err}")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            warnings.warn(f"skipping {path}: not a run record (no config)")
            continue
        records.append(record)
    return records


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}


class _Absent:
    """Marks a config path a record lacks (None is a real config value)."""


def matches(config: dict[str, Any], select: dict[str, Any]) -> bool:
    """Whether the flattened ``config`` has every ``select`` value."""
    return all(config.get(path, _Absent) == value for path, value in select.items())


def _one_setting(flats: list[dict[str, Any]], where: str) -> None:
    """Seeds of one cell must share every other config value: pooling two settings would hide one."""
    keys = {k for f in flats for k in f if not k.startswith(PER_RUN_KEYS)}
    differ = sorted(k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1)
    if differ:
        raise ValueError(f"{where}: its runs differ in {differ}; pin those in the row's `select`")


def is_result(config: dict[str, Any], record: dict[str, Any]) -> bool:
    """False, warning with the record's run directory, when its flattened ``config`` has model.init=random:
    its numbers measure random weights, so it must never fill a cell."""
    if config.get("model.init") != "random":  # records from before the knob existed are pretrained
        return True
    warnings.warn(f"skipping record {record.get('run_dir') or record.get('config_hash')}: model.init=random "
                  f"(random weights, not a fine-tuning result)")
    return False


def runs_by_seed(records: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """``{seed: record}``: a later record replaces an earlier one of its seed.

    An ``interrupted`` record (stopped by a signal after a checkpoint) is a run still to finish, not a result.
    """
    finished = (r for r in records if r.get("status") != "interrupted")
    return {r["config"].get("train", {}).get("seed"): r for r in finished}


def result_configs(spec: TableSpec, records: Iterable[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(flattened config, record)`` of every record of ``spec.model`` that is a result (`is_result`)."""
    return [(config, r) for r in records
            if (config := _flatten(r["config"])).get("model.name") == spec.model and is_result(config, r)]


def cell_records(spec: TableSpec, row: Row, col: Column,
                 flat: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[dict]:
    """The records of one cell (``flat``: `result_configs`); they must be one setting (`_one_setting`)."""
    chosen = [(config, r) for config, r in flat if matches(config, {"task.name": col.task} | row.select)]
    _one_setting([c for c, _ in chosen], f"table {spec.name}, row {row.label!r}, column {col.label!r}")
    return [r for _, r in chosen]


def summarise(records: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """``{status, mean, std, n}`` of ``metric``×100 over seeds (`runs_by_seed`)."""
    runs = list(runs_by_seed(records).values())
    if not runs:
        return {"status": "missing", "mean": math.nan, "std": math.nan, "n": 0}
    if any(r.get("status") != "completed" for r in runs):
        return {"status": "failed", "mean": math.nan, "std": math.nan, "n": len(runs)}
    missing = [r.get("run_dir") for r in runs if metric not in r.get("metrics", {})]
    if missing:
        raise KeyError(f"metric {metric!r} not in records {missing}; they have {sorted(runs[0].get('metrics', {}))}")
    values = pd.Series([100 * r["metrics"][metric] for r in runs])
    return {"status": "ok", "mean": values.mean(), "std": values.std(ddof=1) if len(values) > 1 else math.nan,
            "n": len(values)}


def _average(cells: pd.DataFrame) -> dict[str, Any]:
    """The Avg. line of one row's task cells."""
    complete = (cells.status == "ok").all()
    return {"row": cells.row.iloc[0], "column": AVG, "status": "ok" if complete else "missing",
            "mean": cells["mean"].mean() if complete else math.nan,
            "std": cells["std"].mean(skipna=False) if complete else math.nan,
            "n": cells.n.min() if complete else 0,
            "paper": cells.paper.mean(skipna=False)}


def build_table(spec: TableSpec, records: Iterable[dict[str, Any]], paper: pd.DataFrame) -> pd.DataFrame:
    """The tidy table: one line per (row, column) incl. Avg.

    Columns: row, column, status ("ok" | "failed" | "missing"), mean, std, n (seeds), paper (published
    number), diff (ours − paper), best (bold), wins (the row's "#").
    """
    flat = result_configs(spec, records)
    lines = []
    for row in spec.rows:
        for col in spec.columns:
            lines.append({"row": row.label, "column": col.label,
                          **summarise(cell_records(spec, row, col, flat), col.metric),
                          "paper": paper_value(paper, row.paper, col.paper)})
    table = pd.DataFrame(lines)
    table = pd.concat([table, pd.DataFrame([_average(g) for _, g in table.groupby("row", sort=False)])],
                      ignore_index=True)
    shown = table["mean"].round(2)
    table["diff"] = table["mean"] - table["paper"]
    table["best"] = (table.status == "ok") & (shown == shown.groupby(table.column).transform("max"))
    wins = table[table.column != AVG].groupby("row", sort=False).best.sum()
    return table.assign(wins=table.row.map(wins))


@dataclass(frozen=True)
class Style:
    """How one output format writes bold, ±, missing cells, labels and a grid of cells."""

    bold: Callable[[str], str]
    pm: str
    missing: str
    label: Callable[[str], str]
    grid: Callable[[list[str], list[list[str]], int], str]  # (header, rows, leading label columns)


def _md_grid(header: list[str], rows: list[list[str]], labels: int) -> str:
    lines = [header, [":---"] * labels + ["---:"] * (len(header) - labels), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def _tex_grid(header: list[str], rows: list[list[str]], labels: int) -> str:
    body = [" & ".join(line) + r" \\" for line in rows]
    return "\n".join([rf"\begin{{tabular}}{{{'l' * labels}{'r' * (len(header) - labels)}}}", r"\toprule",
                      " & ".join(header) + r" \\", r"\midrule", *body, r"\bottomrule", r"\end{tabular}"]) + "\n"


TEX_ESCAPES = {"\\": r"\textbackslash{}", "#": r"\#", "%": r"\%", "&": r"\&", "_": r"\_", "^": r"\^{}",
               "ℓ": r"$\ell$", "✓": r"\checkmark{}", "✗": r"$\times$", "—": "--"}
STYLES = {
    "md": Style(bold=lambda s: f"**{s}**", pm=" ± ", missing=MISSING, label=lambda s: s.replace("|", r"\|"),
                grid=_md_grid),
    "tex": Style(bold=lambda s: rf"\textbf{{{s}}}", pm=r" $\pm$ ", missing="--",
                 label=lambda s: "".join(TEX_ESCAPES.get(ch, ch) for ch in s), grid=_tex_grid),
}


def _ours(line: pd.Series, style: Style) -> str:
    if line.status != "ok":
        return {"failed": FAILED, "missing": style.missing}[line.status]
    text = f"{line['mean']:.2f}" + ("" if math.isnan(line["std"]) else f"{style.pm}{line['std']:.2f}")
    return style.bold(text) if line.best else text


def _published(line: pd.Series) -> str:
    """"80.00 (+1.23)": the paper's number and ours − paper; blank where the paper has no counterpart."""
    if math.isnan(line.paper):
        return ""
    return f"{line.paper:.2f}" + ("" if math.isnan(line["diff"]) else f" ({line['diff']:+.2f})")


def render(spec: TableSpec, table: pd.DataFrame, fmt: str) -> str:
    """Our block (bold best, "#"), then the paper block for the rows that have a published counterpart."""
    if fmt not in STYLES:
        raise ValueError(f"unknown table format {fmt!r}; allowed: {sorted(STYLES)}")
    style = STYLES[fmt]
    columns = [c.label for c in spec.columns] + [AVG]
    cells = table.set_index(["row", "column"])
    ours = [[style.label(r.label), *(_ours(cells.loc[(r.label, c)], style) for c in columns),
             str(cells.loc[(r.label, AVG), "wins"])] for r in spec.rows]
    out = [style.grid([style.label(h) for h in ["Method", *columns, WINS]], ours, 1)]
    referenced = [r for r in spec.rows if r.paper is not None]
    if referenced:
        published = [[style.label(r.label), style.label(f"{r.paper.table}: {r.paper.model}, {r.paper.row}"),
                      *(_published(cells.loc[(r.label, c)]) for c in columns)] for r in referenced]
        out.append(style.grid([style.label(h) for h in ["Method", "Paper row", *columns]], published, 2))
    note = (f"Ours: mean ± std (ddof=1) over seeds, ×100; bold = best per column; {WINS} = task columns "
            f"where best. Paper: {spec.reference} Cells: published value (ours − paper).")
    intro = {"md": f"## {spec.title}\n\n{note}\n", "tex": f"% {spec.title}\n% {note}\n"}[fmt]
    return "\n".join([intro, *out])


RENDERERS: dict[str, Callable[[TableSpec, pd.DataFrame], str]] = {
    "md": lambda spec, table: render(spec, table, "md"),
    "tex": lambda spec, table: render(spec, table, "tex"),
    "csv": lambda spec, table: table.to_csv(index=False, float_format="%.4f"),
}


def write_tables(records_root: Path, out_dir: Path, specs: Iterable[TableSpec],
                 paper_dir: Path = PAPER_DIR) -> list[Path]:
    """Build every spec from the records under ``records_root``; write ``out_dir/<name>.{md,tex,csv}``."""
    records, paper = load_records(records_root), load_paper(paper_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in specs:
        table = build_table(spec, records, paper)
        for ext, make in RENDERERS.items():
            written.append(out_dir / f"{spec.name}.{ext}")
            written[-1].write_text(make(spec, table))
    return written
