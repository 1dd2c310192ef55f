"""Progress bars that also show in log files (SLURM, nohup): in a file they update every 30 s."""

import sys

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs) -> tqdm:
    terminal = sys.stderr.isatty()
    return tqdm(iterable, mininterval=0.5 if terminal else 30.0, dynamic_ncols=terminal, **kwargs)
