"""How many CPU threads peftmerge's work uses: torch (intra- and inter-op) and OpenMP.

On a machine shared with other work, torch's default (one thread per core) oversubscribes the cores and
every step waits on the slowest thread. :func:`default_threads` is the rule the CLI applies when
``--threads`` is not given:

    OMP_NUM_THREADS when set, else max(1, cores - round(1-minute load average)), at most cores

:func:`set_threads` applies a count to whatever is already loaded and, through the environment, to
torch when it loads later. The merge engine's block workers follow torch's thread count; its numba kernels
run on those workers (no numba thread pool), so numba's own setting is left alone: changing
``NUMBA_NUM_THREADS`` after numba started its pool is an error in numba.
"""

from __future__ import annotations

import math
import os
import sys

from .errors import PeftmergeError

_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """``OMP_NUM_THREADS`` if set, else the cores left idle by the load average (at least 1, at most cores)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    n = cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    if not math.isfinite(load):
        load = 0.0
    return max(1, min(n, n - round(load)))


def check_threads(n) -> int:
    """``n`` as a thread count >= 1 (a one-line error otherwise)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PeftmergeError(f"threads {n!r} must be a whole number >= 1 (e.g. --threads 2)")
    return n


def set_threads(n: int | None = None) -> int:
    """Use ``n`` threads (default: :func:`default_threads`) in torch and OpenMP; returns ``n``.

    Libraries not loaded yet read it from the environment when they load (``OMP_NUM_THREADS``); loaded ones
    are set directly. torch's inter-op pool can only be sized before
    its first use, so a later call leaves it as it is.
    """
    n = check_threads(default_threads() if n is None else n)
    for key in _ENV:
        os.environ[key] = str(n)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(n)
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # the inter-op pool already started: its size is fixed for this process
            pass
    return n
