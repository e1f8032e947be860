"""Progress bars (tqdm) for long runs: live on a terminal; where stderr is a file or a pipe (a log, CI)
a line at most every :data:`QUIET_INTERVAL_S` seconds instead of thousands of redraws."""
from __future__ import annotations

import sys

QUIET_INTERVAL_S = 30.0


def progress(total: int, *, desc: str, unit: str = "step", initial: int = 0, enabled: bool = True, file=None):
    """A tqdm bar on ``file`` (default stderr), or None when ``enabled`` is false."""
    if not enabled:
        return None
    from tqdm import tqdm

    file = file if file is not None else sys.stderr
    tty = hasattr(file, "isatty") and file.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=file, dynamic_ncols=tty,
                mininterval=0.1 if tty else QUIET_INTERVAL_S, maxinterval=10.0 if tty else QUIET_INTERVAL_S)
