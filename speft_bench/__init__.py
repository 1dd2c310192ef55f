"""speft-bench: a Hydra benchmark harness for sparse parameter-efficient fine-tuning."""

__version__ = "0.1.0"
