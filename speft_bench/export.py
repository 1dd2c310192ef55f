"""A finished run's trained model, rebuilt from its folder; and its merged export.

``load_trained(run_dir)`` recomposes the run's config from its record (the same config hash, or it
refuses), loads the base model as the run did, and applies what the method saved (``Method.load``):
the model it returns gives the run's dev predictions bit for bit.  ``merged(model)`` folds every
adapter into plain linears, so ``save_pretrained`` writes a checkpoint that transformers alone loads.

    python -m speft_bench.export RUN_DIR --evaluate      # the dev metrics again, beside the record's
    python -m speft_bench.export RUN_DIR --merged OUT    # a plain transformers checkpoint + tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from speft_bench import PROJECT_ROOT, precision, records
from speft_bench.config import register_schemas, validate
from speft_bench.errors import ConfigError

GROUPS = ("model", "task", "method", "metric", "masking")  # config groups chosen by name


@dataclass
class Trained:
    """The reloaded model and what evaluating it needs (``kind`` has its dev data loaded)."""

    model: nn.Module
    tokenizer: Any
    typed: dict[str, Any]
    kind: Any
    record: dict[str, Any]

    def evaluate(self) -> dict[str, Any]:
        """The record fields the run's evaluation wrote (metrics, …), computed again on this model."""
        spec = self.typed["train"]
        with precision.autocast(spec, next(self.model.parameters()).device):
            return self.kind.evaluate(self.model, self.tokenizer, spec)


def run_config(record: dict[str, Any]):
    """The run's config as a typed Hydra config: its groups composed by name, its values merged on top.

    Raises ``ConfigError`` when the result hashes differently from the record (the code's schema has
    changed since: ``python scripts/migrate_records.py`` brings committed records up to date).
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    stored = record["config"]
    register_schemas()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{group}={stored[group]['name']}" for group in GROUPS])
    cfg = OmegaConf.merge(cfg, {key: value for key, value in stored.items() if key != "hydra"})
    found = records.config_hash(records.resolved_config(cfg))
    if found != record["config_hash"]:
        raise ConfigError(f"the record's config hashes to {found} with this code, not {record['config_hash']}: "
                          f"migrate the record (python scripts/migrate_records.py) or check out its commit "
                          f"{record.get('environment', {}).get('git', {}).get('commit')}")
    return cfg


def load_trained(run_dir: str | Path, device: str = "cpu") -> Trained:
    """The trained model of the completed run in ``run_dir``, in eval mode on ``device``."""
    from speft_bench.methods import METHODS
    from speft_bench.run import load_base, seed_everything

    run_dir = Path(run_dir)
    record = records.read_record(run_dir / records.RECORD_NAME)
    if record.get("status") != "completed":
        raise ConfigError(f"{run_dir}: the run did not complete (status {record.get('status')!r}); nothing to reload")
    cfg = run_config(record)
    typed = validate(cfg)
    seed_everything(typed["train"])  # a head or body the run initialised at random is drawn again, identically
    kind, _, tokenizer, _, model = load_base(typed, torch.device(device))
    model = METHODS[typed["method"].name].load(model, run_dir, typed)
    return Trained(model.eval(), tokenizer, typed, kind, record)


def merged(model: nn.Module) -> nn.Module:
    """``model`` with every adapter merged into plain ``nn.Linear`` weights (in place; returned)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    from speft_bench.methods.speft.model import SPARSE_DELTAS
    from speft_bench.methods.spsft.model import ROW_DELTAS

    SPARSE_DELTAS.detach(model, merge=True)
    ROW_DELTAS.detach(model, merge=True)
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):  # LoRA / PiSSA / DoRA: W += scaling·BA (DoRA: rescaled)
            module.merge()
            model.set_submodule(name, module.get_base_layer())
        elif isinstance(module, ModulesToSaveWrapper):  # the trained head a peft adapter brought
            model.set_submodule(name, module.modules_to_save[module.active_adapters[0]])
    return model


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m speft_bench.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder: record.json and what the method saved")
    parser.add_argument("--evaluate", action="store_true", help="evaluate the reloaded model; print both metrics")
    parser.add_argument("--merged", type=Path, metavar="OUT", help="write the merged model and tokenizer here")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    trained = load_trained(args.run_dir, args.device)
    if args.evaluate:
        metrics = trained.evaluate()["metrics"]
        print(json.dumps({"record": trained.record["metrics"], "reloaded": metrics,
                          "identical": metrics == trained.record["metrics"]}, indent=2))
    if args.merged is not None:
        model = merged(trained.model)
        model.save_pretrained(args.merged)
        trained.tokenizer.save_pretrained(args.merged)
        records.honour_umask(args.merged)
        print(f"merged model written to {args.merged}")


if __name__ == "__main__":
    main()
