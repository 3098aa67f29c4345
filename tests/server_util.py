"""Start ``llamagen serve`` in a subprocess on a free port for the server tests."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest

import llamagen

def serving(tmp_path_factory, name, model, *args, key=None):
    """A module fixture's server, for ``yield from``: ``llamagen serve --model MODEL ARGS...``
    started, yielded (with ``model_path``), and checked to exit cleanly when the module ends."""
    srv = Server(["--model", model, *args], tmp_path_factory.mktemp("srv") / f"{name}.log", key=key)
    srv.model_path = model
    yield srv
    assert srv.stop() == 0, srv.log()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running ``llamagen serve``; ``url`` is its base URL."""

    def __init__(self, args, log_path: Path, *, key=None, timeout=120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        self.log_path = log_path
        env = dict(os.environ)
        # the subprocess imports the llamagen this test process imports
        root = str(Path(llamagen.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self._log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "llamagen.cli", "serve", "--port", str(self.port),
               "--no-access-log", *map(str, args)]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llamagen serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"llamagen serve not ready in {timeout} s:\n{self.log()}")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def metric(url: str, name: str, headers=None) -> float:
    """The value of a one-sample metric family from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(url + "/metrics", headers=headers or {}, timeout=5).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


# -- llama-server, the reference ---------------------------------------------------------------

def llama_server_binary():
    """llama-server from this checkout's build directory, built first if it is missing (or
    LLAMAGEN_LLAMA_SERVER): the reference is never skipped."""
    env = os.environ.get("LLAMAGEN_LLAMA_SERVER")
    if env:
        return env
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "native"))
    from build import llama_tool
    return llama_tool("llama-server")


def post_json(url, body, timeout=30):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def running_llama_server(model_path, extra_args, log_dir):
    """A llama-server from this checkout's build on a free port (one slot, 512 cells, 1 thread
    unless ``extra_args`` say otherwise); yields its base URL."""
    exe = llama_server_binary()
    port = free_port()
    log = Path(log_dir) / "server.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([exe, "-m", str(model_path), "--host", "127.0.0.1",
                                 "--port", str(port), "-c", "512", "-np", "1", "-t", "1",
                                 "--no-webui", *extra_args],
                                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama-server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama-server did not become healthy:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
