"""Run records: one JSON per run with everything needed to trace a number back to its cause.

Records are written atomically (temp file + rename): a killed run leaves a complete record or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import subprocess
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from speft_bench import PROJECT_ROOT, cluster

RECORD_NAME = "record.json"
TRACKED_PACKAGES = ("speft-bench", "torch", "transformers", "peft", "datasets", "hydra-core", "omegaconf",
                    "lm_eval", "scikit-learn", "scipy", "numpy", "pandas", "wandb")


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain data, interpolations resolved, enums as their names."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


# Top-level config keys that say where and how to run, not what: not part of a run's identity.
NOT_IDENTITY = ("paths", "logger", "resume", "dry_run")


# (group, knob) → default: knobs that change how a run is carried out but not its results (resuming from
# any checkpoint is bit-identical, tests/test_checkpoints.py), hashed at their default so that turning them
# on for a rerun (periodic checkpoints on a preemptible partition) keeps the run's identity and its records.
HASHED_AT_DEFAULT = {("train", "checkpoint_every"): None}


def config_hash(config: dict[str, Any]) -> str:
    """Identity of a run: the resolved config without ``NOT_IDENTITY`` and with ``HASHED_AT_DEFAULT`` at
    their defaults (neither changes results)."""
    identity = {k: v for k, v in config.items() if k not in NOT_IDENTITY}
    for (group, knob), default in HASHED_AT_DEFAULT.items():
        if knob in identity.get(group, {}):
            identity[group] = {**identity[group], knob: default}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def completed_records(root: Path) -> dict[str, Path]:
    """Config hash → the first (sorted) completed record of it anywhere under ``root``.

    Records are written atomically, so every ``record.json`` found is whole; one that does not parse
    was not written by us and is ignored.
    """
    found: dict[str, Path] = {}
    for path in sorted(Path(root).rglob(RECORD_NAME)):
        try:
            record = read_record(path)
        except (OSError, ValueError):
            continue
        if record.get("status") == "completed" and isinstance(record.get("config_hash"), str):
            found.setdefault(record["config_hash"], path)
    return found


def find_completed(root: Path, config_hash: str) -> Path | None:
    """A completed record with this config hash anywhere under ``root``, or None."""
    return completed_records(root).get(config_hash)


def git_state(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """The commit the code ran at, and the tracked files outside ``results/`` that differed from it.

    ``results/`` is left out: a sweep or a bench writes there while runs go on (tables, bench JSON), which
    says nothing about the code or configs a run used."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()

    try:
        changed = git("diff", "HEAD", "--name-only", "--", ".", ":(exclude)results").splitlines()
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changed), "changed": changed[:20]}
    except (OSError, subprocess.SubprocessError):  # not a checkout, or no commit yet
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    def get(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {name: get(name) for name in TRACKED_PACKAGES}


def environment() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "slurm": cluster.slurm_environment(),  # job id, array task, node, allocated CPUs/GPUs; null outside SLURM
        "packages": package_versions(),
        "git": git_state(),
    }


def honour_umask(root: Path) -> None:
    """Give ``root`` and, if a folder, everything under it the modes ``open()`` and ``mkdir()`` would (0o666,
    0o777, less the umask): safetensors (adapters, ``save_pretrained``) writes 0600 files and ``mkdtemp``
    0700 folders, which would hide a run's weights or a shared model cache from the project's group."""
    mask = os.umask(0o022)  # Python < 3.13 can only read the umask by setting it: put it back at once
    os.umask(mask)
    root = Path(root)
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def write_atomic(path: Path, write: Callable[[Any], None], binary: bool = False) -> None:
    """``write(file)`` into a temp file beside ``path``, fsync, rename over ``path``: a reader (or a run
    killed mid-write) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # not mkstemp: its 0600 would make records private; mode 0o666 here is narrowed by the umask, as open()'s
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, lambda f: json.dump(data, f, indent=2, sort_keys=False, default=str))


def read_record(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
