"""Build llama.cpp's tools and our native loop from the package's own CMake build directory.

The directory (build/cmake-<backend>) was configured by setup.py, possibly from a pip build
environment that no longer exists: re-point it at the cmake and ninja found now, then build.
"""
from __future__ import annotations

import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_dir(backend: str = "cpu") -> str:
    return os.environ.get("LLAMAGEN_BUILD_DIR") or os.path.join(ROOT, "build", f"cmake-{backend}")


def build_targets(*targets: str, backend: str = "cpu", jobs: int | None = None) -> str:
    """Build the given CMake targets; return the build directory."""
    bdir = build_dir(backend)
    if not os.path.exists(os.path.join(bdir, "CMakeCache.txt")):
        raise RuntimeError(f"no CMake build at {bdir}: install llamagen from this checkout first "
                           "(pip install -e .)")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("cmake not found on PATH (pip install cmake)")
    args = [cmake, "-S", os.path.join(ROOT, "llamagen"), "-B", bdir]
    ninja = shutil.which("ninja")
    if ninja:
        args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
    subprocess.run(args, check=True, capture_output=True)
    subprocess.run([cmake, "--build", bdir, "-j", str(jobs or os.cpu_count() or 2), "--target", *targets],
                   check=True, capture_output=True)
    return bdir


_BUILT: set = set()


def llama_tool(name: str, backend: str = "cpu") -> str:
    """The path of one of llama.cpp's programs (llama-server, llama-perplexity, llama-embedding,
    ...) in our build directory, brought up to date once per process (a no-op build takes half a
    second): a binary left from before a patch changed would compare the library against other
    kernels (a rerank test read 1.7e-6 off after patch 0010 changed)."""
    exe = os.path.join(build_dir(backend), "bin", name)
    if (name, backend) not in _BUILT:
        build_targets(name, backend=backend)
        _BUILT.add((name, backend))
    return exe


def native_loop() -> str:
    return os.path.join(build_targets("llamagen-native-loop"), "native", "llamagen-native-loop")
