"""Hydra instantiates launchers only from the ``hydra_plugins`` namespace (which it scans at every start):
speft_bench/launcher.py's SLURM launcher is registered here, for conf/hydra/launcher/slurm.yaml."""

from speft_bench.launcher import SlurmLauncher as _SlurmLauncher


class SlurmLauncher(_SlurmLauncher):
    """``hydra/launcher=slurm``: submitit's SLURM launcher, submitting only what is not done."""
