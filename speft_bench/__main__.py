"""Entry point: ``python -m speft_bench method=lora task=mrpc`` (add ``--multirun`` to sweep)."""

import logging
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from speft_bench.config import register_schemas, validate
from speft_bench.errors import ConfigError

register_schemas()  # before Hydra composes: YAML options pull their schemas from the ConfigStore
log = logging.getLogger("speft_bench")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        validate(cfg)  # a bad type or range fails here, before torch loads
    except ConfigError as err:
        bad_input(err)
    from speft_bench import records
    from speft_bench.models import ModelSourceError
    from speft_bench.run import run

    try:
        if cfg.dry_run:  # counts and a memory estimate on the meta device: no weights, no data, no record
            from speft_bench.dry_run import dry_run, report

            print(report(dry_run(cfg)))
            return None
        identity = records.config_hash(records.resolved_config(cfg))
        done = records.find_completed(Path(cfg.paths.output_dir), identity) if cfg.resume else None
        if done is not None:
            log.info("skipping: a completed record of this config exists at %s (resume=false to rerun)", done)
            record = records.read_record(done)
        else:
            hydra_cfg = HydraConfig.get()
            command = " ".join(["python -m speft_bench", *hydra_cfg.overrides.task])
            record = run(cfg, Path(hydra_cfg.runtime.output_dir), command)
    except (ConfigError, ModelSourceError) as err:
        bad_input(err)
    metrics = record.get("metrics", {})
    counts = record.get("parameters", {})  # absent when the run failed before training
    log.info("%s: %s | trainable %s / %s | %s %s", record["status"], record["config_hash"], counts.get("trainable"),
             counts.get("total"), ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
             record.get("failure", {}).get("reason", ""))
    return metrics.get(record.get("main_metric"))  # for Hydra sweepers that optimise


def bad_input(err: Exception) -> NoReturn:
    """Bad input: a message, not a traceback."""
    log.error("%s: %s", type(err).__name__, err)
    sys.exit(2)


if __name__ == "__main__":
    main()
