"""Fuzzers for the inputs llama.cpp's C++ recurses on or grows with (issue 26): JSON schemas
(deep, wide, $ref-heavy), tool messages, grammar trigger patterns, chat templates, and model output
through the chat parser.  Each runs tests/fuzz_inputs.py in its own process under an 8 GiB
address-space limit: a crash, a hang (one example past 30 s) or a runaway allocation fails the
test and prints the input.  CI gives each 15 s; ``LLAMAGEN_FUZZ_LONG=1`` gives each 6 minutes (30
minutes in all) and prints the counts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

LONG = os.environ.get("LLAMAGEN_FUZZ_LONG") == "1"
SECONDS = 360 if LONG else 15
HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("target", ["schemas", "messages", "triggers", "templates", "output"])
def test_fuzzed_inputs_are_answered_or_refused_never_a_crash(target, tiny_model_path):
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, str(HERE / "fuzz_inputs.py"), str(tiny_model_path), target,
                        str(SECONDS)], capture_output=True, text=True, timeout=SECONDS + 300,
                       env=env, cwd=HERE.parent)
    out = p.stdout + p.stderr
    assert p.returncode == 0, (p.returncode, out[-4000:])
    line = [x for x in out.splitlines() if x.startswith(target + " examples=")]
    assert line, out[-2000:]
    print(line[-1])
    fields = dict(kv.split("=") for kv in line[-1].split()[1:])
    # the strategies reach both sides: inputs that are used and inputs that are refused
    assert int(fields["examples"]) > int(fields["refused"]) > 0, line
