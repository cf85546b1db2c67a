"""Peak memory of the current process, for the logs and the training record."""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """Return the largest resident set size this process has had, in MiB.

    Linux reports ``ru_maxrss`` in KiB, macOS in bytes.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
