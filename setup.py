"""Build llamagen: Cython turns llamagen/_core.pyx into C++, CMake builds llama.cpp (static) and the
extension module out of tree under build/, reusing that directory on every later build.

Environment:
  LLAMAGEN_BACKEND=cpu|cuda|metal   backend compiled into llama.cpp (default cpu)
  LLAMAGEN_LLAMA_CPP_DIR=PATH       build against your own llama.cpp checkout (no download)
  LLAMAGEN_PORTABLE=1               GGML_NATIVE=OFF: no -march=native, for wheels run elsewhere
  LLAMAGEN_AMX=1                    keep ggml's AMX kernels (off: they crash on Q4_K_M at this commit)
  CMAKE_ARGS="-DGGML_X=ON ..."      passed straight to llama.cpp's CMake
  LLAMAGEN_BUILD_DIR=PATH           where CMake builds (default build/cmake-<backend>)
  LLAMAGEN_JOBS=N                   parallel compile jobs (default: all cores)
"""
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
BACKENDS = {
    "cpu": [],
    "cuda": ["-DGGML_CUDA=ON"],
    "metal": ["-DGGML_METAL=ON"],
}


def _fetch_module():
    spec = importlib.util.spec_from_file_location(
        "fetch_llama_cpp", os.path.join(ROOT, "third_party", "fetch_llama_cpp.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildError(SystemExit):
    def __init__(self, msg):
        super().__init__(f"\nllamagen build error: {msg}\n")


class CMakeBuild(build_ext):
    def run(self):
        for tool, hint in (("cmake", "pip install cmake"), ):
            if shutil.which(tool) is None:
                raise BuildError(f"`{tool}` was not found on PATH ({hint}).")
        cxx = os.environ.get("CXX") or "c++"
        if shutil.which(cxx.split()[0]) is None and shutil.which("g++") is None \
                and shutil.which("clang++") is None:
            raise BuildError("no C++ compiler found (install g++ or clang++, or set CXX).")
        super().run()

    def build_extension(self, ext):
        from Cython.Build import cythonize

        backend = os.environ.get("LLAMAGEN_BACKEND", "cpu").strip().lower()
        if backend not in BACKENDS:
            raise BuildError(f"LLAMAGEN_BACKEND={backend!r}: choose one of {', '.join(BACKENDS)}.")
        fetch = _fetch_module()
        try:
            llama_dir, commit = fetch.ensure_llama_cpp()
        except fetch.FetchError as e:
            raise BuildError(str(e))

        build_dir = os.environ.get("LLAMAGEN_BUILD_DIR") or os.path.join(ROOT, "build", f"cmake-{backend}")
        build_dir = os.path.abspath(build_dir)
        cy_dir = os.path.join(ROOT, "build", "cython")
        os.makedirs(cy_dir, exist_ok=True)
        [cy_ext] = cythonize(
            [Extension(ext.name, [os.path.join("llamagen", "_core.pyx")], language="c++")],
            build_dir=cy_dir, include_path=[ROOT], quiet=True,
            compiler_directives={"language_level": 3})
        core_cpp = os.path.abspath(cy_ext.sources[0])

        user_args = shlex.split(os.environ.get("CMAKE_ARGS", ""))
        args = [
            f"-DLLAMA_CPP_DIR={llama_dir}",
            f"-DLLAMAGEN_CORE_SOURCE={core_cpp}",
            f"-DLLAMAGEN_BACKEND={backend}",
            f"-DLLAMAGEN_LLAMA_CPP_COMMIT={commit}",
            f"-DLLAMAGEN_USER_CMAKE_ARGS={' '.join(BACKENDS[backend] + user_args)}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DGGML_NATIVE={'OFF' if os.environ.get('LLAMAGEN_PORTABLE') == '1' else 'ON'}",
            f"-DLLAMAGEN_AMX={'ON' if os.environ.get('LLAMAGEN_AMX') == '1' else 'OFF'}",
        ] + BACKENDS[backend]
        if shutil.which("ccache"):
            args += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache",
                     "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
        args += user_args
        # pip builds in a fresh isolated environment each time, so cmake and ninja may live at a
        # new path: the cache must point at the current ones (objects are kept and reused).
        cmake_exe = shutil.which("cmake")
        ninja = shutil.which("ninja")
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        cache = os.path.join(build_dir, "CMakeCache.txt")
        stamp = os.path.join(build_dir, "llamagen-configure-args.txt")
        wanted = "\n".join([cmake_exe or ""] + args)
        configured = os.path.exists(cache) and os.path.exists(stamp) and open(stamp).read() == wanted
        if not configured:
            if os.path.exists(cache):
                os.remove(cache)
            self._run(["cmake", "-S", os.path.join(ROOT, "llamagen"), "-B", build_dir] + args)
            with open(stamp, "w") as f:
                f.write(wanted)
        jobs = os.environ.get("LLAMAGEN_JOBS") or str(os.cpu_count() or 2)
        self._run(["cmake", "--build", build_dir, "--target", "_core", "-j", jobs])

        built = [f for f in os.listdir(build_dir) if f.startswith("_core") and f.endswith((".so", ".pyd"))]
        if not built:
            raise BuildError(f"CMake finished but no _core module is in {build_dir}")
        dest = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(os.path.join(build_dir, built[0]), dest)
        # llama.cpp's license travels with the code built from it (wheel, and the source
        # package dir for editable installs)
        for d in {os.path.dirname(dest), os.path.join(ROOT, "llamagen")}:
            shutil.copyfile(os.path.join(llama_dir, "LICENSE"), os.path.join(d, "LICENSE.llama.cpp"))

    def _run(self, cmd):
        print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
        # let ccache hit across checkouts (a fresh CI clone reuses a developer's objects)
        env = dict(os.environ)
        env.setdefault("CCACHE_BASEDIR", ROOT)
        env.setdefault("CCACHE_NOHASHDIR", "1")
        try:
            subprocess.run(cmd, check=True, env=env)
        except FileNotFoundError as e:
            raise BuildError(f"{cmd[0]} could not be run: {e}")
        except subprocess.CalledProcessError as e:
            raise BuildError(f"`{' '.join(cmd[:3])} ...` failed with exit code {e.returncode}; "
                             "see the output above.")


setup(
    ext_modules=[Extension("llamagen._core", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
