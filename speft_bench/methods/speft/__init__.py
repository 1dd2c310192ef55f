"""SPEFT (Liu et al., 2024): train a sparse additive delta θ = θ0 + θsp on the target linears.

The entries of θsp are the top-k of a salience metric computed on calibration batches (Algorithm 1),
ranked globally or per layer.  With a dynamic mask, every ``masking.interval`` steps the delta is
merged into θ0, salience is recomputed on fresh batches, a new mask is chosen and the optimizer
is reinitialised (section 3.4; ``masking.optimizer_reset=values``: only the sparse values' state).

``method.py``: the method; ``config.py``: its schema (torch-free); ``model.py``, ``layer.py``: the sparse deltas.
"""
