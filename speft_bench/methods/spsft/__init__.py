"""SPSFT (structured-pruning-based sparse fine-tuning): train the most important output rows.

Per target linear, a structured-pruning importance score (``metric``: l2, taylor, qm_taylor; see
``importance.py``) ranks the output neurons; the top r rows get a trainable, zero-initialised delta
W_f (r × d_in) applied through the fixed row selection M (``layer.py``).  The budget is r rows per
layer (the paper sets r = 2R against LoRA rank R for similar trainable counts) or a ``fraction`` of
each layer's rows (the paper's 5 %).  Optionally the blocks' norm layers train too (LoRA cannot).
Parameter-dependency grouping (paper §4.3, appendix B) is left out: the paper finds it not worth it.

``method.py``: the method; ``config.py``: its schema and qm_taylor's (torch-free); ``model.py``,
``layer.py``: the row deltas.
"""
