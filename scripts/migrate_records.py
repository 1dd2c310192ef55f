"""Bring committed run records up to the current config schema, so resume and `make tables` find them.

When the schema gains a knob, a rerun of a record's own command composes a config (and a hash) that
differs from the stored one by the new key, and resume no longer finds the record.  For every record
under the given folders this recomposes the config from ``record["command"]``, checks that it differs
from the stored one only as ``MIGRATIONS`` allow, and rewrites ``config`` and ``config_hash``; the
previous hash and the changes are appended to ``record["migrations"]``.  Any other difference stops the
script naming the record and the key: a record is never silently relabelled.

    python scripts/migrate_records.py results        # rewrite in place (atomically, one record at a time)
    python scripts/migrate_records.py --check results  # exit 1 if a record needs migrating
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hydra import initialize_config_dir  # noqa: E402

from speft_bench import PROJECT_ROOT, records  # noqa: E402
from speft_bench.config import Compositions, register_schemas  # noqa: E402


def _dynamic(config: dict[str, Any]) -> bool:
    return bool(config.get("masking", {}).get("dynamic")) and config.get("method", {}).get("name") == "speft"


# The schema changes since records were first committed, oldest first.  Per dotted key, what a record
# may differ in from its recomposed command:
#   added:      absent in the record; today's value, or the callable's for that record (what the run did)
#   removed:    absent today; the record's value must be this one
#   kept:       where the callable says the run read the key, the record's value stays (a changed
#               default: a rerun at today's default is another run); elsewhere the value was never read
#               and today's replaces it
MIGRATIONS = [
    {"name": "paper-scale knobs (device, precision, accumulation, checkpointing, random init, salience memory)",
     # each new key at a value that does exactly what the committed runs did (CPU here, fp32, no
     # accumulation or checkpointing, pretrained weights); model.dtype (float32 in every committed
     # record) became train.precision=fp32
     "added": {"train.device": "auto", "train.precision": "fp32", "train.master_fp32": True,
               "train.micro_batch_size": None, "train.gradient_checkpointing": False, "model.init": "pretrained",
               "model.architecture": None, "model.num_layers": None, "method.calibration_micro_batch": None,
               "method.salience_offload": False, "method.value_grad": "auto", "dry_run": False},
     "removed": {"model.dtype": "float32"},
     "kept": {"task.eval.batch_size": lambda config: True}},
    {"name": "masking settings only where a refresh reads them; masking.optimizer_reset",
     # dynamic runs reset only the sparse values' Adam state (today's `values`; the default is the
     # paper's `all`) and kept their interval; elsewhere masking.interval was never read
     "added": {"masking.optimizer_reset": lambda config: "values" if _dynamic(config) else "all"},
     "kept": {"masking.interval": _dynamic}},
    {"name": "paper formulas vs the authors' code: metric.variant, masking.local_split, method.calibration_mode",
     # committed runs computed the paper's formulas (grasp, synflow and fisher records: the only ones
     # whose config has metric.variant), split local budgets in proportion to layer size, and ran
     # salience / importance in eval mode (speft and spsft records)
     "added": {"metric.variant": "paper", "masking.local_split": "proportional", "method.calibration_mode": "eval"}},
    {"name": "checkpoints inside a run: train.checkpoint_every",
     # committed runs saved no periodic checkpoint (null); a checkpoint never changes a run's numbers
     "added": {"train.checkpoint_every": None}},
    {"name": "dead knob train.optimizer removed; train.schedule real (linear, cosine, constant)",
     # AdamW, its only value, is what every run used; linear, the committed runs' schedule, is still the default
     "removed": {"train.optimizer": "adamw"}},
]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def set_path(config: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        config = config[key]
    config[leaf] = value


@contextmanager
def compositions() -> Iterator[Compositions]:
    """Hydra initialized on the project's configs, for :func:`migrated` (records share group choices)."""
    register_schemas()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        yield Compositions()


def recompose(command: str, composed: Compositions) -> dict[str, Any]:
    """The resolved config a rerun of ``command`` (``python -m speft_bench <overrides>``) composes today."""
    return records.resolved_config(composed.compose([a for a in shlex.split(command)[3:] if not a.startswith("--")]))


def _rules() -> dict[str, tuple[str, Any]]:
    """Every migration's allowance per dotted key: (kind, value or callable)."""
    return {path: (kind, value) for migration in MIGRATIONS for kind in ("added", "removed", "kept")
            for path, value in migration.get(kind, {}).items()}


def migrated(record: dict[str, Any], where: Path, composed: Compositions) -> dict[str, Any] | None:
    """The record with today's config and hash, or None when it is current; ValueError if not allowed."""
    old, new = flatten(record["config"]), recompose(record["command"], composed)
    flat_new, rules = flatten(new), _rules()
    changes = {}
    for path in sorted(old.keys() | flat_new.keys()):
        if path.split(".")[0] in records.NOT_IDENTITY:
            continue
        before, after = old.get(path, "<absent>"), flat_new.get(path, "<absent>")
        if before == after:
            continue
        kind, value = rules.get(path, (None, None))
        faithful = value(record["config"]) if kind == "added" and callable(value) else value
        if kind == "added" and before in ("<absent>", faithful):  # present: migrated before, at what the run did
            set_path(new, path, faithful)
            if before == "<absent>":
                changes[path] = {"added": faithful}
        elif kind == "removed" and after == "<absent>" and before == value:
            changes[path] = {"removed": before}
        elif kind == "kept" and before != "<absent>" and after != "<absent>":
            if value(record["config"]):
                set_path(new, path, before)
                changes[path] = {"kept": before, "default_now": after}
            else:
                changes[path] = {"normalised": after, "was, never read": before}
        else:
            raise ValueError(f"{where}: {path} is {before!r} in the record but {after!r} when its command is "
                             f"recomposed; not a change of any migration ({', '.join(m['name'] for m in MIGRATIONS)})")
    for key in records.NOT_IDENTITY:  # where and how it ran: as it was
        if key in record["config"]:
            new[key] = record["config"][key]
    digest = records.config_hash(new)
    if digest == record["config_hash"] and flatten(new) == flatten(record["config"]):
        return None  # current (a kept old value stays a difference from today's default, not a change)
    history = record.get("migrations", []) + [{"name": MIGRATIONS[-1]["name"], "from_hash": record["config_hash"],
                                               "changes": changes}]
    return record | {"config": new, "config_hash": digest, "migrations": history}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any record needs migrating")
    args = parser.parse_args()
    stale = 0
    with compositions() as composed:
        for path in sorted(p for root in args.roots for p in root.rglob(records.RECORD_NAME)):
            record = records.read_record(path)
            if record.get("command") is None or (update := migrated(record, path, composed)) is None:
                continue
            stale += 1
            if not args.check:
                records.write_json_atomic(path, update)
                print(f"{path}: {record['config_hash']} -> {update['config_hash']}")
    print(f"{stale} record(s) {'need migrating' if args.check else 'migrated'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
