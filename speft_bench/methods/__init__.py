"""Fine-tuning methods: one module (or package) per method, selected by ``method.name`` through ``METHODS``.

A method with options has its schema next to its code (``<method>/config.py``, or ``config.py`` here
for the single-module ones), registered with ``speft_bench.schemas.register_schema``: the typed knobs
and the torch-free cross-group rules, checked before torch loads.  Its code (``base.Method``) checks
what needs code registries (``check``, before any model loads) and turns a loaded model into one
whose trainable parameters are exactly its own (``prepare``).

Torch-free: ``METHODS`` imports the method modules only when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from speft_bench.registry import Registry

if TYPE_CHECKING:
    from speft_bench.methods.base import Method

METHODS: Registry[type[Method]] = Registry("method.name", "speft_bench.methods")
