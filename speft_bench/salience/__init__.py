"""Salience metrics for SPEFT: one module per metric, selected by ``metric.name`` through ``SALIENCE_METRICS``.

A metric is a pure function ``(model, weights, batches, **options) -> scores``: ``weights`` maps
target-layer names to their (d_out, d_in) weight Parameters, ``batches`` are calibration batches
(dicts the model takes as ``model(**batch)``, with ``labels``), and ``scores`` has one tensor of the
weight's shape per name, float32 (float64 for float64 weights).  Higher means more salient: masks
keep the top-k.  Its ``options`` are the fields of its schema (``config.py``; none: ``MetricSchema``).

Every metric takes the memory options ``calibration_micro_batch`` (examples per forward/backward;
None: whole batches) and ``offload`` (scores kept on the CPU), and the model's ``mode`` while it runs
(``method.calibration_mode``).  ``base.py`` holds the machinery they share (``compute_salience``,
``mean_gradients``, ``backward_per_layer``, ...).

Torch-free: ``SALIENCE_METRICS`` imports the metric modules only when first used.
"""

from __future__ import annotations

from collections.abc import Callable

from speft_bench.registry import Registry

# name -> (model, weights, batches, **options) -> scores (salience.base.Scores)
SALIENCE_METRICS: Registry[Callable[..., dict]] = Registry("metric.name", "speft_bench.salience")
