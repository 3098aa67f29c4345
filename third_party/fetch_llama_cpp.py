"""Fetch the pinned llama.cpp source into third_party/llama.cpp/.

The pin lives in ``llama_cpp.pin.json`` beside this file: a source distribution on the package registry
(llama-cpp-python carries llama.cpp under ``vendor/llama.cpp``), its sha256, and the parts to unpack.
The download goes through pip, is hash-checked, and is unpacked once; later builds reuse it without
any network access.  ``LLAMAGEN_LLAMA_CPP_DIR`` points a build at a user's own llama.cpp checkout.

Our own small changes to the pinned source are unified diffs beside this file (``llama_cpp-*.patch``),
applied in name order right after unpacking (each says why at the lines it changes); the unpacked tree is tied
to them too, so changing a patch unpacks afresh.  A user's own checkout is built as it is.

Run as a script to fetch (or check) the source: ``python third_party/fetch_llama_cpp.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PIN_FILE = os.path.join(HERE, "llama_cpp.pin.json")
DEST = os.path.join(HERE, "llama.cpp")
CACHE = os.path.join(HERE, ".cache")
PATCHES = HERE                      # our patches: llama_cpp-*.patch beside this file
MARKER = ".llamagen-pin"


class FetchError(RuntimeError):
    """The pinned llama.cpp source could not be made available."""


def patch_files() -> list:
    if not os.path.isdir(PATCHES):
        return []
    return sorted(os.path.join(PATCHES, f) for f in os.listdir(PATCHES)
                  if f.startswith("llama_cpp-") and f.endswith(".patch"))


def load_pin() -> dict:
    with open(PIN_FILE, "rb") as f:
        raw = f.read()
    pin = json.loads(raw)
    # the unpacked tree is tied to the whole pin (hash and the parts unpacked) and to our patches
    h = hashlib.sha256(raw)
    for p in patch_files():
        with open(p, "rb") as f:
            h.update(os.path.basename(p).encode() + b"\0" + f.read())
    pin["stamp"] = h.hexdigest()
    return pin


def _apply_patches(tree: str) -> None:
    for p in patch_files():
        tools = []
        if shutil.which("patch"):
            tools.append(["patch", "-p1", "--forward", "--batch", "--silent", "-d", tree, "-i", p])
        if shutil.which("git"):
            tools.append(["git", "-C", tree, "apply", "-p1", p])
        if not tools:
            raise FetchError(f"neither `patch` nor `git` is on PATH: cannot apply {p}")
        proc = subprocess.run(tools[0], capture_output=True, text=True)
        if proc.returncode != 0:
            raise FetchError(f"{os.path.basename(p)} does not apply to the pinned llama.cpp:\n"
                             f"{(proc.stderr or proc.stdout).strip()[-2000:]}")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sdist_name(pin: dict) -> str:
    return f"{pin['package'].replace('-', '_')}-{pin['version']}.tar.gz"


def _download(pin: dict) -> str:
    """Return the path of the hash-checked source distribution, downloading it if needed."""
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, _sdist_name(pin))
    if os.path.exists(path) and _sha256(path) == pin["sha256"]:
        return path
    spec = f"{pin['package']}=={pin['version']}"
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        # --no-binary for this one package only: `:all:` would also build pip's metadata helpers
        # (cmake, ...) from source, which takes many minutes and gains nothing.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", pin["package"],
               "--disable-pip-version-check", "-d", tmp, spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = [f for f in os.listdir(tmp) if f.endswith(".tar.gz")]
        if proc.returncode != 0 or not got:
            raise FetchError(
                f"could not download {spec} (the pinned llama.cpp source) with pip:\n"
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}\n"
                "Check that the package registry is reachable, or build against a local llama.cpp "
                "checkout with LLAMAGEN_LLAMA_CPP_DIR=/path/to/llama.cpp.")
        digest = _sha256(os.path.join(tmp, got[0]))
        if digest != pin["sha256"]:
            raise FetchError(
                f"hash mismatch for {got[0]}: expected sha256 {pin['sha256']}, got {digest}. "
                "The registry served a different file than the pin in third_party/llama_cpp.pin.json; "
                "refusing to build it. Use LLAMAGEN_LLAMA_CPP_DIR to build against a trusted checkout.")
        shutil.move(os.path.join(tmp, got[0]), path)
    return path


def _unpack(pin: dict, sdist: str) -> None:
    prefix = f"{pin['package'].replace('-', '_')}-{pin['version']}/{pin['subdir']}/"
    wanted = tuple(pin["include"])
    tmp = DEST + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(prefix):
                continue
            rel = m.name[len(prefix):]
            top = rel.split("/", 1)[0]
            if top not in wanted or not (m.isfile() or m.isdir()):
                continue
            m.name = rel
            members.append(m)
        if not members:
            raise FetchError(f"{sdist} holds no {prefix}: is the pin right?")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp, members=members, **kwargs)
    _apply_patches(tmp)
    with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
        f.write(pin["stamp"] + "\n")
    shutil.rmtree(DEST, ignore_errors=True)
    os.rename(tmp, DEST)


def ensure_llama_cpp() -> tuple[str, str]:
    """Return (source dir, commit) of the llama.cpp to build, fetching the pinned one if needed."""
    user_dir = os.environ.get("LLAMAGEN_LLAMA_CPP_DIR")
    if user_dir:
        user_dir = os.path.abspath(os.path.expanduser(user_dir))
        if not os.path.isfile(os.path.join(user_dir, "include", "llama.h")):
            raise FetchError(f"LLAMAGEN_LLAMA_CPP_DIR={user_dir} is not a llama.cpp source tree "
                             "(no include/llama.h)")
        commit = "unknown"
        try:
            commit = subprocess.run(["git", "-C", user_dir, "rev-parse", "--short=12", "HEAD"],
                                    capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
        return user_dir, commit
    pin = load_pin()
    marker = os.path.join(DEST, MARKER)
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            if f.read().strip() == pin["stamp"]:
                return DEST, pin["llama_cpp_commit"]
    _unpack(pin, _download(pin))
    return DEST, pin["llama_cpp_commit"]


if __name__ == "__main__":
    try:
        src, commit = ensure_llama_cpp()
    except FetchError as e:
        sys.exit(f"error: {e}")
    print(f"llama.cpp {commit} at {src}")
