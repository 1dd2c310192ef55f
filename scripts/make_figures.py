"""Figures from the benchmark results (results/bench/*.json) -> results/figures/*.png.

    python scripts/make_figures.py            # `make tables` runs it too

* mask_density_per_layer.png: per target layer, the density of each salience metric's mask (LoRA r=8 budget,
  global ranking) — where each metric puts its trainable entries;
* salience_histograms.png: log10 |score| per metric over all target weights;
* mask_jaccard.png: Jaccard overlap between the masks of different metrics;
* bench_<name>.png: step time and training memory per method, from `scripts/bench.py steps`, or (paper shapes,
  `scripts/bench_paper_shape.py`) the measured memory parts and the 32-block extrapolation beside SPSFT Table 7;
* table_<name>.png: each table `make tables` built (results/tables/<name>.csv): our score per method and
  task as bars (± std over seeds), the paper's published value as a black tick where there is one.
A figure whose input does not exist yet is skipped with a note (run `make bench` first).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from speft_bench import claims  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # bench_paper_shape's fit, for its figure


def short(layer: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``3.query``."""
    parts = layer.split(".")
    index = next(i for i, p in enumerate(parts) if p.isdigit())
    return f"{parts[index]}.{'.'.join(parts[index + 1:]).replace('attention.', 'attn.')}"


def save(fig: plt.Figure, path: Path) -> None:
    """Write one PNG and free the figure (make_figures draws one per table; pyplot keeps them all open)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def salience_figures(data: dict, out: Path) -> None:
    metrics = list(data["seconds"])
    layers = list(next(iter(data["density_per_layer"].values())))
    fig, ax = plt.subplots(figsize=(14, 4.5))
    for metric in metrics:
        ax.plot(range(len(layers)), [100 * data["density_per_layer"][metric][n] for n in layers], marker=".",
                label=metric)
    ax.set_xticks(range(len(layers)), [short(n) for n in layers], rotation=90, fontsize=7)
    ax.set_ylabel("mask density (%)")
    ax.set_title(f"Per-layer density of each metric's mask (MiniLM-L6, {data['budget']:,} entries = LoRA r=8, global)")
    ax.legend(ncol=4, fontsize=8)
    save(fig, out / "mask_density_per_layer.png")

    edges = np.asarray(data["histogram_edges_log10"])
    fig, axes = plt.subplots(2, 4, figsize=(14, 6), sharex=True)
    for ax, metric in zip(axes.flat, metrics):
        hist = data["histograms"][metric]
        ax.stairs(hist["counts"], edges, fill=True)
        ax.set_title(f"{metric} ({100 * hist['negative_fraction']:.0f}% < 0)", fontsize=9)
        ax.set_yscale("log")
    fig.supxlabel("log10 |score| (clipped to [-16, 2])")
    save(fig, out / "salience_histograms.png")

    matrix = np.array([[data["jaccard"][a][b] for b in metrics] for a in metrics])
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(metrics)), metrics, rotation=45, ha="right")
    ax.set_yticks(range(len(metrics)), metrics)
    for i in range(len(metrics)):
        for j in range(len(metrics)):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] < 0.5 else "black")
    fig.colorbar(image, label="Jaccard overlap of masks")
    ax.set_title("Mask overlap between salience metrics")
    save(fig, out / "mask_jaccard.png")


def bench_figure(name: str, data: dict, out: Path) -> None:
    rows = data["rows"]
    labels = [f"{r['model']}\n{r['scope']}/{r['variant']}" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 0.35 * len(rows) + 2))
    y = np.arange(len(rows))
    left.barh(y, [r["step_s"] for r in rows])
    left.set_xlabel("s / step (median)")
    right.barh(y, [r["train_mb"] - r["inference_mb"] for r in rows])
    right.set_xlabel("training memory: peak − inference peak (MB)")
    for ax in (left, right):
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()
    fig.suptitle(f"{name}: {data['machine']}", fontsize=9)
    save(fig, out / f"bench_{name}.png")


def paper_shape_figure(name: str, data: dict, out: Path) -> None:
    """Left: training memory (mem_TTL − mem_M) of each fp32 method at its deepest measured N, split into the
    tensors it holds; right: mem extrapolated to 32 blocks (the bench's a + b·N fit) beside SPSFT Table 7's."""
    import bench_paper_shape as bench  # scripts/: the fit and the paper's cells, as in its report

    rows = [r for r in data["rows"] if "error" not in r and r["mem_mb"] is not None  # salience rows: a peak only
            and r["precision"] == "fp32" and r.get("ablate", "none") == "none"]
    deepest = {}
    for r in rows:
        key = (r["model"], r["variant"])
        if r["layers"] >= deepest.get(key, r)["layers"]:
            deepest[key] = r
    keys = sorted(deepest)
    labels = [f"{model}: {variant}" for model, variant in keys]
    fits = bench.depth_fits(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 0.3 * len(keys) + 2), sharey=True)
    y, start = np.arange(len(keys)), np.zeros(len(keys))
    for label, key in {"saved activations": "saved_activations_mb", "gradients": "gradients_mb",
                       "optimizer state": "optimizer_state_mb"}.items():
        widths = np.array([deepest[k][key] / 1024 for k in keys])
        left.barh(y, widths, left=start, label=label)
        start += widths
    left.scatter([deepest[k]["mem_mb"] / 1024 for k in keys], y, marker="|", color="black", s=150, zorder=3,
                 label="mem = mem_TTL − mem_M (measured peak)")
    left.set_yticks(y, [f"{lab} (N={deepest[k]['layers']})" for lab, k in zip(labels, keys)], fontsize=7)
    left.set_xlabel("GB at the deepest N measured")
    left.legend(fontsize=7, loc="lower right")
    extrapolated = [fits.get((m, "fp32", v, "none"), {}).get("mem_mb", {}).get("extrapolated", np.nan)
                    for m, v in keys]  # NaN, no bar: a variant measured at one depth so far
    right.barh(y, extrapolated, color="grey", label="ours, extrapolated to 32 blocks")
    paper = [bench.paper_value(m, v, "mem") for m, v in keys]
    right.scatter([float(p.lstrip(">")) if p != "—" else np.nan for p in paper], y, marker="|", color="red", s=150,
                  zorder=3, label="SPSFT Table 7 (its batch; '>' cells at their bound)")
    right.set_xlabel("mem GB at 32 blocks (fp32)")
    right.legend(fontsize=7, loc="lower right")
    left.invert_yaxis()
    machines = "; ".join(dict.fromkeys(r["machine"] for r in rows))
    fig.suptitle(f"{name}: fp32, batch {rows[0]['batch']} ({machines})", fontsize=9)
    save(fig, out / f"bench_{name}.png")


def table_figure(path: Path, out: Path) -> None:
    cells = pd.read_csv(path)
    methods, columns = list(dict.fromkeys(cells["row"])), list(dict.fromkeys(cells["column"]))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.18 * len(methods) * len(columns) + 3), 4.5))
    for i, method in enumerate(methods):
        mine = cells[cells["row"] == method].set_index("column").reindex(columns)
        x = np.arange(len(columns)) + (i - (len(methods) - 1) / 2) * width
        ax.bar(x, mine["mean"], width, yerr=mine["std"].fillna(0), label=method)  # missing cells: no bar
        ax.scatter(x, mine["paper"], marker="_", color="black", s=60, zorder=3)
    ax.set_xticks(np.arange(len(columns)), columns)
    ax.set_ylabel("score ×100 (bars: ours; ticks: paper)")
    ax.set_title(f"{path.stem} (results/tables/{path.name})", fontsize=9)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    save(fig, out / f"table_{path.stem}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--tables", type=Path, default=ROOT / "results" / "tables")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "figures")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    salience = args.bench / "salience.json"
    if salience.exists():
        salience_figures(json.loads(salience.read_text()), args.out)
    else:
        print(f"skipped salience figures: no {salience} (run `python scripts/bench.py salience`)")
    for path in sorted(args.bench.glob("*.json")):
        data = json.loads(path.read_text())
        rows = data.get("rows") or [{}]
        if "train_mb" in rows[0]:  # `bench.py steps` outputs; kernels etc. are tables
            bench_figure(path.stem, data, args.out)
        elif "mem_TTL_mb" in rows[0]:  # scripts/bench_paper_shape.py
            paper_shape_figure(path.stem, data, args.out)
    for path in sorted(args.tables.glob("*.csv")):
        if path.stem != claims.NAME:
            table_figure(path, args.out)
    print(f"figures in {args.out}")


if __name__ == "__main__":
    main()
