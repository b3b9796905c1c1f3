"""Importing the routing API is light: peft (seconds of imports) loads only where a model is built."""

from __future__ import annotations

import subprocess
import sys


def test_importing_routing_does_not_import_peft():
    code = "import sys, peftmerge.routing, peftmerge.io.heads; print('peft' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == "False"
