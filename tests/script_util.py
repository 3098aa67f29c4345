"""Running test code in a fresh interpreter: cases that could crash or abort the process fail
their test instead of taking the test run down."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(body: str, timeout: float = 300, env_extra: dict | None = None, **names):
    """Run ``body`` (dedented) in a fresh interpreter with llamagen, threading, time, random and
    sys imported and ``names`` bound (``MODEL=str(path)``), ``env_extra`` added to its
    environment; returns (returncode, output)."""
    head = "import llamagen, threading, time, random, sys\n" + "".join(
        f"{k} = {v!r}\n" for k, v in names.items())
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(env_extra or {}))
    # (the script goes through stdin: a 300,000-rule grammar is past the argument size limit)
    p = subprocess.run([sys.executable, "-"], input=head + textwrap.dedent(body),
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    return p.returncode, p.stdout + p.stderr
