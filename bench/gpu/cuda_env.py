"""Find what a CUDA build of llama.cpp needs on a machine whose CUDA toolkit may be split over
pip wheels, and print it as shell lines for bench/gpu/run.sh to eval:

    eval "$(python3 bench/gpu/cuda_env.py)"

GGML_CUDA needs nvcc, the CUDA runtime, cuBLAS (headers and libraries) and, unless
GGML_CUDA_NO_VMM, the driver library libcuda.  CMake's FindCUDAToolkit looks for them in the
toolkit that nvcc belongs to.  Images that install CUDA from NVIDIA's pip wheels keep cuBLAS in
site-packages (nvidia/cu13/{include,lib}, or nvidia/cublas/ for CUDA 12 wheels) and ship only
versioned sonames (libcublas.so.13), which find_library does not match; the driver's libcuda
comes with the driver (libcuda.so.1).  This script finds each piece and, for those CMake would
miss, prints the CMake cache entries that name them (CUDA_cublas_LIBRARY, ...), an include flag
for the cuBLAS headers, and the library folders for LD_LIBRARY_PATH.  It prints nothing for what
the toolkit itself provides.  A summary goes to stderr.
"""
from __future__ import annotations

import glob
import os
import shlex
import shutil
import site
import subprocess
import sys

LIB_DIRS = ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")


def note(*a):
    print("cuda_env:", *a, file=sys.stderr)


def find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for pattern in ("/usr/local/cuda/bin/nvcc", "/usr/local/cuda-*/bin/nvcc", "/opt/cuda/bin/nvcc"):
        for path in sorted(glob.glob(pattern), reverse=True):
            if os.access(path, os.X_OK):
                return path
    for base in _site_dirs():
        for path in glob.glob(os.path.join(base, "nvidia", "*", "bin", "nvcc")):
            return path
    return None


def toolkit_roots(nvcc):
    """Candidate toolkit roots: nvcc's own (through wrapper scripts: nvcc -v names TOP), then the
    usual places."""
    roots = []
    if nvcc:
        try:
            out = subprocess.run([nvcc, "-v", "--dryrun", "-c", "x.cu", "-o", "x.o"], capture_output=True,
                                 text=True, timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                if line.startswith("#$ TOP="):
                    roots.append(os.path.realpath(line.split("=", 1)[1].strip()))
        except (OSError, subprocess.SubprocessError):
            pass
        if not roots:
            roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    roots += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    out = []
    for r in roots:
        r = os.path.realpath(r)
        if os.path.isdir(r) and r not in out:
            out.append(r)
    return out


def _site_dirs():
    dirs = []
    try:
        dirs += site.getsitepackages()
    except AttributeError:
        pass
    dirs += [p for p in sys.path if p and os.path.isdir(p)]
    seen = []
    for d in dirs:
        d = os.path.realpath(d)
        if d not in seen:
            seen.append(d)
    return seen


def _first(patterns):
    for pattern in patterns:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def find_in_toolkit(roots, header, lib):
    """(include dir, library path) inside a toolkit root, if both are there (unversioned .so)."""
    for r in roots:
        inc = _first([os.path.join(r, "include", header), os.path.join(r, "targets", "*", "include", header)])
        so = _first([os.path.join(r, d, f"lib{lib}.so") for d in LIB_DIRS])
        if inc and so:
            return os.path.dirname(inc), so
    return None, None


def find_in_wheels(header, lib):
    for base in _site_dirs():
        for inc in sorted(glob.glob(os.path.join(base, "nvidia", "*", "include", header))):
            pkg = os.path.dirname(os.path.dirname(inc))
            so = _first([os.path.join(pkg, "lib", f"lib{lib}.so"), os.path.join(pkg, "lib", f"lib{lib}.so.*")])
            if so:
                return os.path.dirname(inc), so
    return None, None


def find_driver(roots):
    """(libcuda path, whether CMake finds it unaided): the toolkit's stub, else the driver's
    library; (None, False) on a machine without a driver."""
    for r in roots:
        for d in LIB_DIRS:
            for name in ("libcuda.so", "stubs/libcuda.so"):
                if os.path.exists(os.path.join(r, d, name)):
                    return os.path.join(r, d, name), True
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    hits = sorted(ln.split("=>")[-1].strip() for ln in out.splitlines()
                  if "libcuda.so" in ln and "x86-64" in ln)
    for path in hits + ["/usr/local/nvidia/lib64/libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
                        "/usr/lib64/libcuda.so.1"]:
        if os.path.exists(path):
            return path, False
    return None, False


def main():
    nvcc = find_nvcc()
    if not nvcc:
        note("no nvcc found")
        print("echo 'cuda_env: no nvcc found' >&2")
        return 1
    roots = toolkit_roots(nvcc)
    note(f"nvcc {nvcc}; toolkit roots {roots}")
    lines = [f"export CUDACXX={shlex.quote(nvcc)}"]
    bindir = os.path.dirname(nvcc)
    if shutil.which("nvcc") is None:
        lines.append(f'export PATH={shlex.quote(bindir)}:"$PATH"')
    cmake, ld = [], []
    for lib, extra in (("cublas", "cublasLt"),):
        inc, so = find_in_toolkit(roots, "cublas_v2.h", lib)
        if so:
            note(f"{lib}: in the toolkit ({so})")
            continue
        inc, so = find_in_wheels("cublas_v2.h", lib)
        if not so:
            note(f"{lib}: NOT FOUND (the CUDA build will fail at CMake's configure step)")
            continue
        libdir = os.path.dirname(so)
        other = _first([os.path.join(libdir, f"lib{extra}.so"), os.path.join(libdir, f"lib{extra}.so.*")])
        note(f"{lib}: from a wheel: headers {inc}, {so}, {other}")
        cmake += [f"-DCUDA_{lib}_LIBRARY={so}"]
        if other:
            cmake += [f"-DCUDA_{extra}_LIBRARY={other}"]
        cmake += [f"-DCMAKE_CUDA_FLAGS=-I{inc}", f"-DCMAKE_CXX_FLAGS=-I{inc}"]
        ld.append(libdir)
    driver, cmake_finds_it = find_driver(roots)
    if driver is None:
        note("libcuda: not found (no driver): building without VMM (GGML_CUDA_NO_VMM=ON)")
        cmake.append("-DGGML_CUDA_NO_VMM=ON")
    elif not cmake_finds_it:
        note(f"libcuda: {driver} (named for CMake)")
        cmake.append(f"-DCUDA_cuda_driver_LIBRARY={driver}")
    else:
        note(f"libcuda: {driver}")
    for r in roots[:1]:
        for d in LIB_DIRS:
            if glob.glob(os.path.join(r, d, "libcudart.so*")):
                ld.append(os.path.join(r, d))
                break
    if cmake:
        lines.append("export CMAKE_ARGS=" + shlex.quote(" ".join(cmake)) + '"${CMAKE_ARGS:+ $CMAKE_ARGS}"')
    if ld:
        lines.append("export LD_LIBRARY_PATH=" + shlex.quote(":".join(ld)) + '"${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"')
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
