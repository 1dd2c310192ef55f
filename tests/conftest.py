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
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One core per worker (the Makefile's TEST_WORKERS): torch's OpenMP threads spin-wait, and 2 workers of
    # 2 threads each on 2 cores took 719 s against 509 s for one process; at one thread each, 322 s.
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402

from tests.helpers import MINILM  # noqa: E402


@pytest.fixture
def group_umask():
    """umask 027 for the test (a shared project's group may read, not write): files that honour it come out
    0640 and folders 0750, where safetensors, mkstemp and mkdtemp alone give 0600 and 0700."""
    previous = os.umask(0o027)
    yield
    os.umask(previous)


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
