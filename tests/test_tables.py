"""Records → tables on hand-built records with exact cells; every spec and paper CSV is well-formed."""

import json
import math
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from speft_bench.evaluation.lm_eval import task_names as lm_eval_task_names
from speft_bench.tables import (
    PAPER_DIR,
    TABLES_CONF,
    Column,
    PaperRow,
    Row,
    TableSpec,
    build_table,
    load_paper,
    load_records,
    load_specs,
    matches,
    paper_value,
    render,
    result_configs,
    write_tables,
)
from tests.helpers import CONF, ROOT

PAPER_TEXTS = {"SPEFT": "speft-salience-aware-sparse-finetuning.txt",
               "SPSFT": "spsft-structured-pruning-sparse-finetuning.txt"}
PAPER_COLUMNS = ["paper", "table", "model", "row", "column", "value", "std", "unit", "source_line"]


def record(method, task, seed, score, *, metric="none", status="completed", model="minilm_l6", **method_knobs):
    """A run record with only the fields tables read; ``score`` is the task's main metric, a fraction."""
    main = {"mrpc": "accuracy", "stsb": "pearson"}[task]
    return {"status": status, "run_dir": f"runs/{method}/{task}/seed{seed}",
            "config": {"model": {"name": model}, "task": {"name": task}, "method": {"name": method, **method_knobs},
                       "metric": {"name": metric}, "masking": {"name": "static_global"}, "train": {"seed": seed}},
            "metrics": {main: score} if status == "completed" else {}, "main_metric": main}


SPEC = TableSpec(
    name="toy", title="Toy", model="minilm_l6", reference="a toy paper.",
    columns=(Column("MRPC", "mrpc", "accuracy", paper="MRPC"), Column("STS-B", "stsb", "pearson", paper="STS-B")),
    rows=(Row("LoRA", {"method.name": "lora"}, PaperRow("toy_table", "BERT", "LoRA")),
          Row("Gradient", {"method.name": "speft", "metric.name": "gradient"}),
          Row("PiSSA", {"method.name": "pissa"}),
          Row("DoRA", {"method.name": "dora"})))
PAPER = pd.DataFrame({"table_id": "toy_table", "model": "BERT", "row": "LoRA", "column": ["MRPC", "STS-B"],
                      "value": [80.0, 70.5]})
RECORDS = [
    record("lora", "mrpc", 0, 0.80), record("lora", "mrpc", 1, 0.82),
    record("lora", "stsb", 0, 0.70), record("lora", "stsb", 1, 0.74),
    record("speft", "mrpc", 0, 0.85, metric="gradient"), record("speft", "stsb", 0, 0.71, metric="gradient"),
    record("speft", "mrpc", 0, 0.99, metric="snip"),      # another row's run
    record("lora", "mrpc", 0, 0.99, model="opt_125m"),   # another model's run
    record("pissa", "mrpc", 0, 0.90), record("pissa", "mrpc", 1, 0.0, status="failed"),
    record("pissa", "stsb", 0, 0.60),
]


@pytest.fixture(scope="module")
def table():
    return build_table(SPEC, RECORDS, PAPER).set_index(["row", "column"])


def test_cells_are_mean_and_sample_std_over_seeds(table):
    lora = table.loc[("LoRA", "MRPC")]
    assert (lora.status, lora.n, lora["mean"]) == ("ok", 2, pytest.approx(81.0))
    assert lora["std"] == pytest.approx(math.sqrt(2))  # ddof=1: |80 − 82| / √2
    assert math.isnan(table.loc[("Gradient", "MRPC"), "std"])  # one seed: no ±


def test_an_interrupted_run_is_no_result_and_hides_no_finished_seed():
    from speft_bench.tables import summarise

    assert summarise([record("lora", "mrpc", 0, 0.0, status="interrupted")], "accuracy")["status"] == "missing"
    done = summarise([record("lora", "mrpc", 0, 0.80), record("lora", "mrpc", 0, 0.0, status="interrupted")],
                     "accuracy")
    assert (done["status"], done["mean"]) == ("ok", pytest.approx(80.0))


def test_failed_and_missing_cells_carry_no_number(table):
    assert table.loc[("PiSSA", "MRPC"), "status"] == "failed" and math.isnan(table.loc[("PiSSA", "MRPC"), "mean"])
    assert table.loc[("DoRA", "MRPC"), "status"] == "missing"
    assert table.loc[("PiSSA", "Avg."), "status"] == "missing"  # no average over a failed task


def test_average_best_wins_and_paper_difference(table):
    avg = table.loc[("LoRA", "Avg.")]
    assert (avg["mean"], avg["std"]) == (pytest.approx(76.5), pytest.approx((math.sqrt(2) + math.sqrt(8)) / 2))
    assert table.loc[("Gradient", "Avg."), "mean"] == pytest.approx(78.0)
    assert set(table.best[table.best].index) == {("Gradient", "MRPC"), ("LoRA", "STS-B"), ("Gradient", "Avg.")}
    assert table.wins.groupby("row").first().to_dict() == {"LoRA": 1, "Gradient": 1, "PiSSA": 0, "DoRA": 0}
    assert table.loc[("LoRA", "MRPC"), "diff"] == pytest.approx(1.0)
    assert table.loc[("LoRA", "Avg."), "paper"] == pytest.approx(75.25)
    assert math.isnan(table.loc[("Gradient", "MRPC"), "paper"])


def test_markdown_cells():
    md = render(SPEC, build_table(SPEC, RECORDS, PAPER), "md")
    assert "| LoRA | 81.00 ± 1.41 | **72.00 ± 2.83** | 76.50 ± 2.12 | 1 |" in md
    assert "| Gradient | **85.00** | 71.00 | **78.00** | 1 |" in md
    assert "| PiSSA | failed | 60.00 | — | 0 |" in md
    assert "| DoRA | — | — | — | 0 |" in md
    assert "| LoRA | toy_table: BERT, LoRA | 80.00 (+1.00) | 70.50 (+1.50) | 75.25 (+1.25) |" in md
    tex = render(SPEC, build_table(SPEC, RECORDS, PAPER), "tex")
    assert r"LoRA & 81.00 $\pm$ 1.41 & \textbf{72.00 $\pm$ 2.83} & 76.50 $\pm$ 2.12 & 1 \\" in tex


def test_ties_are_all_bold_and_a_later_run_replaces_its_seed():
    records = [record("lora", "mrpc", 0, 0.5), record("lora", "mrpc", 0, 0.9),  # re-run of seed 0
               record("speft", "mrpc", 0, 0.90004, metric="gradient")]
    table = build_table(SPEC, records, PAPER).set_index(["row", "column"])
    assert (table.loc[("LoRA", "MRPC"), "mean"], table.loc[("LoRA", "MRPC"), "n"]) == (pytest.approx(90.0), 1)
    assert table.loc[("LoRA", "MRPC"), "best"] and table.loc[("Gradient", "MRPC"), "best"]


def test_one_cell_never_pools_two_settings():
    records = [record("lora", "mrpc", 0, 0.8, r=8), record("lora", "mrpc", 1, 0.8, r=4)]
    with pytest.raises(ValueError, match=r"'LoRA', column 'MRPC'.*\['method.r'\]"):
        build_table(SPEC, records, PAPER)
    records[1]["config"]["method"]["r"] = 8
    records[1]["config"]["train"]["checkpoint_every"] = 50  # how, not what: one setting (config hash too)
    assert build_table(SPEC, records, PAPER).set_index(["row", "column"]).loc[("LoRA", "MRPC"), "n"] == 2


def test_the_protocols_lr_runs_fill_the_lr_table_and_no_twin_cell():
    """The committed runs of conf/experiment/sweeps/protocol/*_lr.yaml go to the lr table only: without
    them the twin tables' cells are the same, and each of their lr table cells is its run's score."""
    committed = load_records(ROOT / "results" / "cpu")
    paper, specs = load_paper(PAPER_DIR), {spec.name: spec for spec in load_specs(TABLES_CONF)}
    lr_runs = [r for r in committed if re.search(r"sweeps/protocol/(lora|speft_gradient)_lr\b", r["command"])]
    assert len(lr_runs) == 8  # 2 methods x 2 tasks x lr 5e-5, 2e-4
    others = [r for r in committed if r not in lr_runs]
    for name in ("speft_salience", "speft_masking", "spsft_glue"):
        before, after = (build_table(specs[name], records, paper) for records in (others, committed))
        pd.testing.assert_frame_equal(before, after)
    spec = specs["lr_sensitivity"]
    lr = build_table(spec, committed, paper).set_index(["row", "column"])
    flat = result_configs(spec, lr_runs)
    assert len(flat) == len(lr_runs)
    for config, r in flat:
        [row] = [row.label for row in spec.rows if matches(config, row.select)]
        [column] = [c.label for c in spec.columns if c.task == config["task.name"]]
        cell = lr.loc[(row, column)]
        assert cell["n"] == 1 and cell["mean"] == pytest.approx(100 * r["metrics"]["accuracy"])
    assert lr.loc[("LoRA, lr 5e-4", "MRPC"), "n"] >= 3  # the twin's seeds 0-2


def write_toy_tables(tmp_path):
    """Records for SPEC (plus one truncated record.json) and the toy paper CSV -> tmp_path/tables."""
    for i, rec in enumerate(RECORDS):
        (tmp_path / "runs" / str(i)).mkdir(parents=True)
        (tmp_path / "runs" / str(i) / "record.json").write_text(json.dumps(rec))
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "record.json").write_text('{"status": "compl')
    paper_dir = tmp_path / "paper"
    paper_dir.mkdir()
    PAPER.drop(columns="table_id").to_csv(paper_dir / "toy_table.csv", index=False)
    with pytest.warns(UserWarning, match="broken"):
        return write_tables(tmp_path / "runs", tmp_path / "tables", [SPEC], paper_dir)


def test_write_tables_skips_unreadable_records(tmp_path):
    written = write_toy_tables(tmp_path)
    with pytest.warns(UserWarning, match="broken"):
        assert len(load_records(tmp_path / "runs")) == len(RECORDS)
    assert sorted(p.name for p in written) == ["toy.csv", "toy.md", "toy.tex"]
    assert "80.00 (+1.00)" in (tmp_path / "tables" / "toy.md").read_text()


@pytest.mark.slow
def test_make_figures_draws_one_png_per_table_and_skips_missing_inputs(tmp_path):
    write_toy_tables(tmp_path)
    (tmp_path / "bench").mkdir()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_figures.py"),
                           "--bench", str(tmp_path / "bench"),
                           "--tables", str(tmp_path / "tables"), "--out", str(tmp_path / "figures")],

                          capture_output=True, text=True, check=True)
    assert "skipped salience figures" in done.stdout
    assert [p.name for p in (tmp_path / "figures").iterdir()] == ["table_toy.png"]
    png = (tmp_path / "figures" / "table_toy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # IHDR width/height: figsize (8, 4.5) in at 120 dpi, the minimum width for 4 methods x 3 columns (MRPC, STS-B, Avg.)
    assert int.from_bytes(png[16:20], "big") == 960 and int.from_bytes(png[20:24], "big") == 540


def test_bad_spec_key_names_the_allowed_ones(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: bad\ntitle: t\nmodel: m\ncolumns: []\nrows: []\ncolour: red\n")
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]; allowed: \['name', 'title'"):
        load_specs(tmp_path)


# CPU twins; full-data comparisons (results/mrpc_full); the LLM track (results/llm)
SPEC_FOLDERS = (TABLES_CONF, TABLES_CONF / "full_data", TABLES_CONF / "llm")


@pytest.mark.parametrize(("folder", "spec"), [(f, s) for f in SPEC_FOLDERS for s in load_specs(f)],
                         ids=lambda v: getattr(v, "name", ""))
def test_every_spec_loads_and_its_references_exist(folder, spec):
    paper = load_paper(PAPER_DIR)
    assert folder.joinpath(f"{spec.name}.yaml").exists()  # file named like the table
    for col in spec.columns:
        task = yaml.safe_load((CONF / "task" / f"{col.task}.yaml").read_text())
        if task.get("kind") == "instruct":  # lm-eval metrics: "<shipped lm-eval task>/<metric>,<filter>"
            assert col.metric.split("/")[0] in lm_eval_task_names() and "," in col.metric, col
        else:
            assert col.metric in task["metrics"], (col, task["metrics"])
    referenced = [paper_value(paper, row.paper, col.paper) for row in spec.rows for col in spec.columns
                  if row.paper is not None and col.paper is not None]
    assert referenced or "no published numbers" in spec.reference
    assert all(math.isfinite(v) for v in referenced)


@pytest.mark.parametrize("path", sorted(PAPER_DIR.glob("*.csv")), ids=lambda p: p.stem)
def test_paper_csvs_are_numeric_and_trace_to_their_source_line(path):
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert df.columns.tolist() == PAPER_COLUMNS and len(df) > 0
    paper, number = re.fullmatch(r"(speft|spsft)_table(\d+)", path.stem).groups()
    assert set(df.paper) == {paper.upper()} and set(df.table) == {number}
    values = pd.to_numeric(df.value)  # raises on a non-number
    stds = pd.to_numeric(df["std"].replace("", float("nan")))
    assert values.notna().all() and (stds.dropna() >= 0).all()
    assert not df.duplicated(["model", "row", "column"]).any()
    source = ROOT.parent / "shared" / "papers" / PAPER_TEXTS[paper.upper()]
    if not source.exists():
        pytest.skip(f"paper text not found at {source}")
    lines = source.read_text().split("\n")
    for _, cell in df.iterrows():
        printed = {float(x) for x in re.findall(r"\d*\.\d+|\d+", lines[int(cell.source_line) - 1])}
        assert float(cell.value) in printed and (not cell["std"] or float(cell["std"]) in printed), dict(cell)


def test_run_records_under_results_can_be_committed_and_weights_cannot():
    # sweeps write results/<set>/multirun/...; an ignore rule meant for Hydra's top-level multirun/
    # once hid every swept record from git, so the tables in git had no records behind them
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    assert not ignored("results/cpu/multirun/2026-01-01_00-00-00/x/seed0/0/record.json")
    assert not ignored("results/llm/runs/x/seed0/2026-01-01_00-00-00/record.json")
    assert ignored("results/cpu/multirun/2026-01-01_00-00-00/x/seed0/0/adapter.safetensors")
    assert ignored("results/cpu/multirun/2026-01-01_00-00-00/x/seed0/0/adapter/adapter_config.json")
    assert ignored("results/llm/runs/x/seed0/2026-01-01_00-00-00/model/config.json")
    assert not ignored("conf/model/minilm_l6.yaml")
    assert ignored("multirun/2026-01-01_00-00-00/0/record.json") and ignored("outputs/x/record.json")
