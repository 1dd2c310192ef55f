"""LoRA, PiSSA and DoRA through peft, injected in place on the model's target linears.

PiSSA is LoRA with a principal-singular-vector init, DoRA is LoRA with a learned magnitude:
one method (``model.py``), three registered names, told apart by ``method.init`` and ``method.use_dora``
(``config.py``: the schema, shared by the three).

The run saves a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) with
the task head as ``modules_to_save``, so ``PeftModel.from_pretrained(base, run_dir / "adapter")`` is
the trained model.  PiSSA's config keeps ``init_lora_weights="pissa"``: loading recomputes the
residual base weights by the same SVD the run did, then sets A and B.
"""
