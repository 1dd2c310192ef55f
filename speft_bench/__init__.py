"""speft-bench: a Hydra benchmark harness for sparse parameter-efficient fine-tuning."""

from pathlib import Path

__version__ = "0.1.0"

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the checkout: conf/, results/, shared data beside it
