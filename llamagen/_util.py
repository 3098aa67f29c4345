"""Small helpers with no llama.cpp dependency."""
from __future__ import annotations

import os


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once), at least 1."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(base + "core_id") as f:
                core = f.read().strip()
            with open(base + "physical_package_id") as f:
                pkg = f.read().strip()
        except OSError:
            return max(1, len(allowed))
        cores.add((pkg, core))
    return max(1, len(cores) or len(allowed))
