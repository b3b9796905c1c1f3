"""Run ``peftmerge`` in a child process that stops at a chosen point, for the fault tests.

    python fault_runner.py PAUSE ARGS...

PAUSE says where the child waits (so that the test can kill it there, or race it against another):

- ``merge``: after the inputs are planned, before any module is merged (nothing written yet);
- ``write``: inside the output's temporary folder, after the first file was written;
- ``swap``: with the whole output written, just before it is renamed into place (until ``$FAULT_GO`` exists);
- ``fsize-after-checkpoint``: no pause; once ``$FAULT_CHECKPOINT`` is complete, the file size limit drops to
  1 KiB (``ulimit -f 1`` from then on: the next checkpoint cannot be written, as on a full disk).

The child touches ``$FAULT_READY`` when it reaches a pause.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from pathlib import Path


def _ready() -> None:
    Path(os.environ["FAULT_READY"]).write_text(str(os.getpid()))


def _wait_for_go() -> None:
    go = Path(os.environ["FAULT_GO"])
    while not go.exists():
        time.sleep(0.01)


def main() -> None:
    pause, args = sys.argv[1], sys.argv[2:]
    if pause == "merge":
        import peftmerge.merge.combine as combine

        plan = combine.plan_modules

        def plan_then_stop(*a, **kw):
            plans = plan(*a, **kw)
            _ready()
            time.sleep(600)
            return plans

        combine.plan_modules = plan_then_stop
    elif pause == "write":
        import peftmerge.io.adapter_writer as writer

        save = writer.save_file

        def save_then_stop(state, path, *a, **kw):
            save(state, path, *a, **kw)
            _ready()
            time.sleep(600)

        writer.save_file = save_then_stop
    elif pause == "swap":
        import peftmerge.io.atomic as atomic

        swap = atomic._swap_in

        def wait_then_swap(tmp, out, overwrite):
            _ready()
            _wait_for_go()
            return swap(tmp, out, overwrite)

        atomic._swap_in = wait_then_swap
    elif pause == "fsize-after-checkpoint":
        done = Path(os.environ["FAULT_CHECKPOINT"]) / "peftmerge-complete"

        def limit_when_done():
            while not done.exists():
                time.sleep(0.002)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

        threading.Thread(target=limit_when_done, daemon=True).start()
    elif pause != "none":
        raise SystemExit(f"unknown pause {pause}")

    from peftmerge.cli.main import main as cli

    cli(args, prog_name="peftmerge")


if __name__ == "__main__":
    main()
