"""scripts/bench_paper_shape.py's arithmetic: the depth fit, its extrapolation and the report's ratios, on
rows made up for the purpose (the measurements themselves are a benchmark, not a test)."""

import importlib.util

import pytest

from tests.helpers import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_paper_shape", ROOT / "scripts" / "bench_paper_shape.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fit_recovers_a_line_and_shows_the_residuals(bench):
    line = bench.fit([1, 2, 4], [3.0 + 0.5 * n for n in (1, 2, 4)], full=32)
    assert line["a"] == pytest.approx(3.0) and line["b"] == pytest.approx(0.5)
    assert line["extrapolated"] == pytest.approx(19.0) and max(map(abs, line["residuals"])) < 1e-12
    bent = bench.fit([1, 2, 4], [1.0, 2.0, 5.0], full=32)  # not a line: least squares leaves residuals
    assert sum(bent["residuals"]) == pytest.approx(0.0, abs=1e-12) and max(map(abs, bent["residuals"])) > 0.1


def row(variant, layers, mem_mb, ablate="none", step_s=1.0):
    return {"model": "llama2_7b", "precision": "fp32", "layers": layers, "variant": variant, "ablate": ablate,
            "trainable": 1, "mem_M_mb": 1024.0 * layers, "mem_TTL_mb": 1024.0 * layers + mem_mb, "mem_mb": mem_mb,
            "step_s": step_s, "command": "python scripts/bench_paper_shape.py", "machine": "test"}


def test_report_extrapolates_each_variant_and_takes_ratios_within_an_ablation(bench):
    rows = [row("lora", n, 1024.0 * n) for n in (1, 2)] + [row("spsft", n, 512.0 * n, step_s=0.5) for n in (1, 2)]
    rows += [row("lora", n, 2048.0 * n, ablate="sgd") for n in (1, 2)]
    rows += [row("spsft", n, 512.0 * n, ablate="sgd") for n in (1, 2)]
    text = bench.report(rows)
    # measured rows: SPSFT at N = 2 has half LoRA's mem and half its step time
    assert "| llama2_7b | fp32 | spsft | none | 2 | 1 | 0.50 | 0.50 | 2.00 | 3.00 | 1.00 | 0.50 |" in text
    # extrapolated to 32 blocks: mem 32 GB (LoRA) and 16 GB (SPSFT, × LoRA 0.50); with SGD against SGD's LoRA, 0.25
    assert "| llama2_7b | fp32 | lora | none | 1, 2 | 32.00 | 64.00 (2.000) | 32.00 (+0.000, +0.000) | 1.00 |" in text
    assert "| llama2_7b | fp32 | spsft | none | 1, 2 | 32.00 | 48.00 (1.500) | 16.00 (+0.000, +0.000) | 0.50 |" in text
    assert "| llama2_7b | fp32 | spsft | sgd | 1, 2 | 32.00 | 48.00 (1.500) | 16.00 (+0.000, +0.000) | 0.25 |" in text


def test_salience_peaks_are_set_against_the_speft_training_peak_with_and_without_the_score_buffers(bench):
    def salience(metric, layers):  # peak: 1 GB of model per block plus the score buffers (0.5 GB per buffer)
        buffers = bench.SCORE_BUFFERS.get(metric, 1)
        return row(f"salience:{metric}", layers, 0.0) | {"mem_TTL_mb": 1024.0 * layers * (1 + 0.5 * buffers),
                                                          "mem_mb": None, "scores_mb": 512.0 * layers}
    rows = [row("speft_sampled", n, 1024.0 * n) for n in (1, 2)]  # mem_TTL 2 GB per block: 64 GB at 32
    rows += [salience(m, n) for m in ("gradient", "grasp") for n in (1, 2)]
    text = bench.report(rows)
    # gradient: 48 GB = 0.75 × 64, 16 GB of buffers; GraSP holds two buffers: 64 GB, 32 GB of them
    on_device = "| llama2_7b | fp32 | {} | extrapolated, buffers on the device | "
    assert on_device.format("gradient") + "48.00 | 0.75 | 16.00 | 32.00 | 0.50 | 64.00 (extrapolated) |" in text
    assert on_device.format("grasp") + "64.00 | 1.00 | 32.00 | 32.00 | 0.50 | 64.00 (extrapolated) |" in text


def test_a_salience_peak_measured_at_full_depth_with_offloaded_buffers_adds_them_for_the_peak_with(bench):
    """A GPU row: 32 blocks, buffers on the host (the device's peak), set against SPEFT measured at 32 blocks."""
    rows = [row("speft_sampled", 32, 8 * 1024.0)]  # mem_TTL 40 GB
    rows.append(row("salience:gradient", 32, 0.0) | {"mem_TTL_mb": 30 * 1024.0, "mem_mb": None,
                                                       "scores_mb": 26 * 1024.0, "salience_offload": True})
    text = bench.report(rows)
    assert ("| llama2_7b | fp32 | gradient | measured, buffers offloaded | 56.00 | 1.40 | 26.00 | 30.00 | 0.75 "
            "| 40.00 (measured) |") in text


def test_rows_at_full_depth_are_set_beside_the_paper_without_extrapolation(bench):
    rows = [row(v, 32, mem) for v, mem in (("lora_dropout0.1", 24 * 1024.0), ("lora", 16 * 1024.0),
                                          ("spsft", 12 * 1024.0))]
    text = bench.report(rows)
    assert "Extrapolated" not in text  # one depth: nothing to fit
    # the paper's Table 7 cells for Llama2-7B (results/paper/spsft_table7.csv): SPSFT 47.49 / 17.62
    assert "| llama2_7b | fp32 | spsft | none | 32.00 | 44.00 | 12.00 | 0.75 | 0.50 | 47.49 | 17.62 |" in text


def test_a_failed_configuration_is_a_row_that_says_why(bench):
    text = bench.report([row("lora", 1, 1024.0), {"model": "llama2_7b", "precision": "fp32", "layers": 1,
                                                  "variant": "shira", "ablate": "none",
                                                  "error": "killed by signal 9 (out of memory)"}])
    assert "| llama2_7b | fp32 | shira | none | 1 | error: killed by signal 9 (out of memory) |" in text


def test_step_time_is_fitted_per_block_against_loras(bench):
    """LoRA 2 s per block over a 10 s head, SPEFT 2.2 s per block: 1.10 × LoRA's b, whatever the head costs."""
    rows = [row("lora", n, 1024.0, step_s=10.0 + 2.0 * n) for n in (1, 2, 4)]
    rows += [row("speft_sampled", n, 1024.0, step_s=12.0 + 2.2 * n) for n in (1, 2, 4)]
    rows += [row("spsft", n, 1024.0, step_s=None) for n in (1, 2)]  # memory only: no step-time fit
    text = bench.report(rows)
    assert "| llama2_7b | fp32 | lora | none | 1, 2, 4 | 10.00 | 2.00 (+0.00, +0.00, +0.00) | 1.00 |" in text
    assert "| llama2_7b | fp32 | speft_sampled | none | 1, 2, 4 | 12.00 | 2.20 (+0.00, +0.00, +0.00) | 1.10 |" in text
    assert "| llama2_7b | fp32 | spsft | none | 1, 2 |" not in text.split("Step time per block")[1]


def test_one_file_holds_one_batch(bench, tmp_path):
    rows = [row("lora", 1, 1024.0) | {"batch": "1x2048"}, row("lora", 2, 2048.0)]  # the second: before batches
    bench.check_batch(rows, "1x2048", tmp_path / "a.json")
    with pytest.raises(ValueError, match=r"--batch-size/--seq-len: .*a\.json holds rows at batch 1x2048 .*not 16x512"):
        bench.check_batch(rows, "16x512", tmp_path / "a.json")
    assert bench.report(rows).startswith("Batch (B x T tokens): 1x2048\n")
