"""Hydra instantiates launchers only from the ``hydra_plugins`` namespace (which it scans at every start):
speft_bench/launcher.py's launchers are registered here, for conf/hydra/launcher/{slurm,status}.yaml."""

from speft_bench.launcher import SlurmLauncher as _SlurmLauncher
from speft_bench.launcher import StatusLauncher as _StatusLauncher


class SlurmLauncher(_SlurmLauncher):
    """``hydra/launcher=slurm``: submitit's SLURM launcher, submitting only what is not done."""


class StatusLauncher(_StatusLauncher):
    """``hydra/launcher=status``: which jobs of a sweep are done and which would run; launches nothing."""
