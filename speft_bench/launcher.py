"""The launchers that know what is done: ``hydra/launcher=slurm`` (hydra-submitit-launcher's, submitting
only what is missing) and ``hydra/launcher=status`` (launches nothing; says what a rerun would run).

Over hydra_plugins.hydra_submitit_launcher's ``SlurmLauncher`` the SLURM one changes four things:

* **Before submission** each job's config is composed (``load_sweep_config``, as in the job) and hashed
  as the entry point does; a job whose completed record of that hash exists under its
  ``paths.output_dir`` (with ``resume=true``) is not submitted, so rerunning a sweep asks SLURM only for
  what is missing.  The entry point still checks again inside the job (a record finished meanwhile).
* **Job name** ``auto``: ``speft-<methods>-<tasks>`` of the submitted jobs (squeue and sacct show what
  runs, not ``__main__``); any other ``hydra.launcher.name`` is used as it is.
* **Waiting** for every job, not up to the first failure; through ``sacct``, or ``squeue`` on a cluster
  without accounting (a job gone from squeue is over); each job that did not complete is named.
* **In the job**, SIGTERM (``scancel``, a preemption, ``scontrol requeue``) ends it without a result:
  submitit would ignore it and the run would go on until SLURM's ``KillWait`` SIGKILL, possibly
  writing a completed record.  During training the run's own handler (``speft_bench/checkpoints.py``)
  checkpoints first, records ``interrupted`` and passes the signal on to this one; a requeued job then
  resumes from that checkpoint.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from speft_bench import records

log = logging.getLogger(__name__)

AUTO_NAME = "auto"
POLL_S = 2.0  # result files are looked for this often; sacct/squeue at most every WATCH_S
# submitit's 60 s kept a finished sweep waiting up to a minute for its last job's state; one sacct call
# every 10 s is nothing for slurmdbd
WATCH_S = 10


def task_config(sweep_config: DictConfig) -> DictConfig:
    """The config the job's task function receives: the sweep config without ``hydra`` (as Hydra's run_job)."""
    cfg = copy.deepcopy(sweep_config)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def completed_record(sweep_config: DictConfig, index: dict[Path, dict[str, Path]]) -> Path | None:
    """The completed record of this job's config under its ``paths.output_dir``, if ``resume`` allows.

    ``index``: completed records per output folder, filled as needed (each folder is read once)."""
    cfg = task_config(sweep_config)
    if not cfg.get("resume") or cfg.get("dry_run"):
        return None
    try:
        identity = records.config_hash(records.resolved_config(cfg))
        root = Path(cfg.paths.output_dir)
    except OmegaConfBaseException as err:  # the job will fail on it and say so; run it
        log.warning("cannot hash a job's config before launching it (%s): counted as to run", err)
        return None
    if root not in index:
        index[root] = records.completed_records(root) if root.is_dir() else {}
    return index[root].get(identity)


def job_name(configs: Sequence[DictConfig]) -> str:
    """``speft-<method>[+<method>…]-<task>[+<task>…]`` of ``configs``, in sweep order, at most 100 characters."""

    def names(key: str) -> str:
        found = dict.fromkeys(str(OmegaConf.select(c, key, default="?")) for c in configs)
        return "+".join(found)

    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", f"speft-{names('method.name')}-{names('task.name')}")
    return name[:100]


def _end_job(signum: int, frame) -> None:
    log.warning("%s (scancel, preemption or requeue): ending this job without a result; rerun the sweep (or let "
                "SLURM requeue it) to continue", signal.Signals(signum).name)
    raise SystemExit(128 + signum)  # not an Exception: no handler on the way turns it into a result


@functools.cache
def watcher_class() -> type:
    """submitit's sacct watcher, falling back on squeue (a class made on first use: Hydra imports this
    module at every start, while scanning for plugins, and submitit only when a sweep submits)."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class Watcher(SlurmInfoWatcher):
        """Job states from ``sacct``; on a cluster without accounting (sacct fails) from ``squeue``, where a job
        that has left the queue is over (state ``LEFT_QUEUE``).  Set as each submitted job's ``watcher``."""

        def __init__(self, delay_s: int = WATCH_S) -> None:
            super().__init__(delay_s=delay_s)
            self.warned = False

        def update(self) -> None:  # submitit's, with the squeue fallback in place of "status may be inaccurate"
            command = self._make_command()
            if command is None:
                return
            self._num_calls += 1
            try:
                self._info_dict.update(self.read_info(subprocess.run(command, capture_output=True, timeout=60,
                                                                     check=True).stdout))
            except (OSError, subprocess.SubprocessError) as err:
                self._from_squeue(err)
            self._last_status_check = time.time()
            for job_id in self._registered - self._finished:
                if self.is_done(job_id, mode="cache"):
                    self._finished.add(job_id)

        def _from_squeue(self, err: Exception) -> None:
            if not self.warned:
                detail = (getattr(err, "stderr", None) or b"").decode(errors="replace").strip()
                log.warning("sacct failed (%s%s): following the jobs with squeue (no accounting: is slurmdbd up?)",
                            err, f": {detail}" if detail else "")
                self.warned = True
            pending = self._registered - self._finished
            ids = sorted({x.split("_")[0] for x in pending})
            done = subprocess.run(["squeue", "-h", "--states=all", "-o", "%i|%T|%N", "-j", ",".join(ids)],
                                  capture_output=True, text=True, timeout=60)
            if done.returncode != 0 and "Invalid job id" not in done.stderr:
                log.warning("squeue failed too: %s", done.stderr.strip())
                return
            info = self.read_info("JobID|State|NodeList\n" + done.stdout) if done.returncode == 0 else {}
            for job_id in pending:  # not in the queue any more: over, one way or another
                info.setdefault(job_id, {"JobID": job_id, "State": "LEFT_QUEUE", "NodeList": ""})
            self._info_dict.update(info)

    return Watcher


class SlurmLauncher(SubmititSlurmLauncher):
    """``hydra/launcher=slurm``: see the module docstring."""

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:  # runs inside the SLURM job
        signal.signal(signal.SIGTERM, _end_job)  # in place of submitit's "bypass"
        return super().__call__(*args, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        results: dict[int, JobReturn] = {}
        todo: list[tuple[int, list[str], DictConfig]] = []
        index: dict[Path, dict[str, Path]] = {}
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            done = completed_record(sweep_config, index)
            if done is None:
                todo.append((idx, list(overrides), sweep_config))
                continue
            record = records.read_record(done)
            log.info("\t#%d : %s -- done, not submitted: %s", idx, " ".join(filter_overrides(overrides)), done)
            results[idx] = JobReturn(overrides=list(overrides), cfg=task_config(sweep_config), hydra_cfg=sweep_config,
                                     working_dir=str(done.parent), task_name=str(sweep_config.hydra.job.name),
                                     status=JobStatus.COMPLETED,
                                     _return_value=record.get("metrics", {}).get(record.get("main_metric")))
        if results:
            log.info("%d of %d jobs have a completed record of their config (resume=false reruns them): "
                     "submitting %d", len(results), len(job_overrides), len(todo))
        if todo:
            results.update(self._submit_and_wait(todo))
        return [results[idx] for idx in sorted(results)]

    def _executor(self, name: str):
        """submitit's executor with this launcher's parameters, as the parent's ``launch`` builds it."""
        from submitit import AutoExecutor

        init_keys = {"submitit_folder", "max_num_timeout"}
        executor = AutoExecutor(cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
                                slurm_max_num_timeout=self.params["max_num_timeout"])
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        params = {k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k not in init_keys}
        executor.update_parameters(**(params | {"name": name}))
        return executor

    def _submit_and_wait(self, todo: list[tuple[int, list[str], DictConfig]]) -> dict[int, JobReturn]:
        from submitit.core.utils import UncompletedJobError

        name = self.params["name"]
        name = job_name([task_config(c) for _, _, c in todo]) if name == AUTO_NAME else name
        executor = self._executor(name)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info("Submitit 'slurm' sweep output dir : %s; job name %s", sweep_dir, name)
        for idx, overrides, _ in todo:
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        jobs = executor.map_array(self, *zip(*[(overrides, "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                                                Singleton.get_state()) for idx, overrides, _ in todo]))
        watcher = watcher_class()()
        for job in jobs:
            job.watcher = watcher
        log.info("submitted %s", ", ".join(job.job_id for job in jobs))
        while not all(job.done() for job in jobs):
            time.sleep(POLL_S)
        out: dict[int, JobReturn] = {}
        for (idx, overrides, _), job in zip(todo, jobs):
            try:
                if job.state.upper().startswith("CANCELLED") and not job.paths.result_pickle.exists():
                    # no result will come (SIGTERM ends a job without one): not submitit's 15 s wait for a late file
                    raise UncompletedJobError(f"Job {job.job_id} was cancelled ({job.state}) before it had a result")
                ret = job.results()[0]
                if ret.status is not JobStatus.COMPLETED:  # the task raised: the sweep re-raises it after this
                    log.error("job %s (#%d: %s) failed: %r", job.job_id, idx, " ".join(filter_overrides(overrides)),
                              ret._return_value)
            except Exception as err:  # noqa: BLE001 (cancelled, killed, timed out, failed: each one is reported)
                ret = JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=err)
                first = str(err).splitlines()[:2] if isinstance(err, UncompletedJobError) else [type(err).__name__]
                log.error("job %s (#%d: %s) did not complete (state %s): %s; logs: %s", job.job_id, idx,
                          " ".join(filter_overrides(overrides)), job.state, " ".join(first), job.paths.stderr)
            out[idx] = ret
        failed = sum(r.status is not JobStatus.COMPLETED for r in out.values())
        log.info("%d submitted jobs ended: %d completed, %d not (rerun the same command to do what is missing)",
                 len(out), len(out) - failed, failed)
        return out


class StatusLauncher(Launcher):
    """``hydra/launcher=status``: runs nothing, and says which jobs of the sweep have a completed record of
    their config (a rerun skips them) and which would run: each job composed as any launcher composes it."""

    def __init__(self, **_: Any) -> None:
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        index: dict[Path, dict[str, Path]] = {}
        returns, done = [], 0
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            record = completed_record(sweep_config, index)
            done += record is not None
            log.info("\t#%d : %s -- %s", idx, " ".join(filter_overrides(overrides)),
                     f"done: {record}" if record else "to run")
            # COMPLETED with no value: Hydra's sweeper reads every job's return value
            returns.append(JobReturn(overrides=list(overrides), cfg=task_config(sweep_config), hydra_cfg=sweep_config,
                                     status=JobStatus.COMPLETED))
        log.info("%d of %d jobs have a completed record of their config; %d to run (nothing was launched)",
                 done, len(job_overrides), len(job_overrides) - done)
        sweep_dir = Path(self.config.hydra.sweep.dir)  # the sweeper saved its config there: nothing ran, remove it
        if sweep_dir.is_dir() and [p.name for p in sweep_dir.iterdir()] == ["multirun.yaml"]:
            shutil.rmtree(sweep_dir)
        return returns
