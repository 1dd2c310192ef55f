"""Where a run is scheduled: the SLURM job it runs in (records) and the CPUs it was given (threads).

Read from the environment SLURM sets in every job (``man sbatch``, "OUTPUT ENVIRONMENT VARIABLES");
outside SLURM everything here is None.  No torch: the launcher imports this in the submitting process.
"""

from __future__ import annotations

import os
from typing import Any


def _int(name: str) -> int | None:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:  # unset, empty, or a per-node list such as SLURM_JOB_CPUS_PER_NODE="2(x3)"
        return None


def allocated_cpus() -> int | None:
    """CPUs SLURM gave this task: ``--cpus-per-task`` when the job asked for it, else all the job's
    CPUs on this node (one task per node, as the launcher submits); None outside SLURM."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return _int("SLURM_CPUS_PER_TASK") or _int("SLURM_CPUS_ON_NODE")


def default_threads(requested: int | None) -> int | None:
    """torch's intra-op threads for ``train.num_threads``: the value when set; when null, the CPUs
    SLURM allocated (torch would otherwise start one thread per core of the whole node), or None
    (torch's default) outside SLURM."""
    return requested if requested is not None else allocated_cpus()


def slurm_environment() -> dict[str, Any] | None:
    """The SLURM job this process runs in, for the record; None outside SLURM."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    env = os.environ.get
    array_job, task = env("SLURM_ARRAY_JOB_ID"), _int("SLURM_ARRAY_TASK_ID")
    return {
        # the id squeue, sacct and scancel show: <array job>_<task> for a task of an array
        "job": f"{array_job}_{task}" if array_job and task is not None else env("SLURM_JOB_ID"),
        "job_id": env("SLURM_JOB_ID"),
        "array_job_id": array_job,  # None unless the job is one task of an array
        "array_task_id": task,
        "job_name": env("SLURM_JOB_NAME"),
        "cluster": env("SLURM_CLUSTER_NAME"),
        "partition": env("SLURM_JOB_PARTITION"),
        "node": env("SLURMD_NODENAME") or env("SLURM_JOB_NODELIST"),
        "cpus": allocated_cpus(),
        "cpus_on_node": _int("SLURM_CPUS_ON_NODE"),
        "gpus": _int("SLURM_GPUS_ON_NODE") or 0,
        "gpu_ids": env("SLURM_JOB_GPUS") or env("SLURM_STEP_GPUS"),  # as SLURM numbers them on the node
        "mem_per_node_mb": _int("SLURM_MEM_PER_NODE"),
        "mem_per_cpu_mb": _int("SLURM_MEM_PER_CPU"),
        "restart_count": _int("SLURM_RESTART_COUNT") or 0,  # times SLURM requeued the job (preemption, requeue)
    }
