"""``llamagen serve``: the server's bootstrap (model, logging, engine factory, uvicorn); the
CLI parses the arguments and calls ``serve``."""
from __future__ import annotations

import logging
import os
import sys

import uvicorn

import llamagen
from llamagen._util import default_model_path as _default_model_path
from llamagen.server.app import create_app


def serve(a) -> int:
    """Run the server for the parsed ``llamagen serve`` arguments (cli.py defines them); the
    status to exit with.  ValueError for a bad argument (the CLI prints it)."""
    keys = list(a.api_key or [])
    if a.api_key_file:
        try:
            with open(a.api_key_file, encoding="utf-8") as fh:
                keys += [line.strip() for line in fh if line.strip()]
        except OSError as e:
            raise ValueError(f"cannot read --api-key-file {a.api_key_file!r}: "
                             f"{e.strerror or e}") from None
    if any(not k for k in keys):
        raise ValueError("--api-key must not be empty")
    path = a.model or _default_model_path()
    if not os.path.isfile(path):
        raise ValueError(f"--model {path!r}: no such file")
    if not keys and a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"llamagen: warning: serving on {a.host} without --api-key: anyone who can reach "
              f"it can use it", file=sys.stderr)
    # the model loads before the port is bound: a bad file is a one-line error and status 2;
    # the context (the KV cache) is made while the server already answers /health with 503
    template = a.chat_template
    if a.chat_template_file is not None:
        if template is not None:
            raise ValueError("--chat-template and --chat-template-file are exclusive")
        try:
            with open(a.chat_template_file, encoding="utf-8") as fh:
                template = fh.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--chat-template-file {a.chat_template_file!r}: {e}") from None
    model = llamagen.Model(path, n_gpu_layers=a.n_gpu_layers)
    if template is not None:
        try:
            model.chat_template_source(template)
        except (ValueError, TypeError) as e:
            model.close()
            raise ValueError(f"the chat template: {e}") from None
    log = logging.getLogger("llamagen.server")      # uvicorn configures only its own loggers
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-9s llamagen: %(message)s"))
        log.addHandler(handler)
        log.setLevel(a.log_level.upper() if a.log_level != "trace" else "DEBUG")
        log.propagate = False
    fatal: list = []

    def make_engine():
        return llamagen.AsyncEngine(model, n_ctx=a.ctx_size, n_parallel=a.parallel,
                                    n_threads=a.threads, n_batch=a.batch_size,
                                    max_queue=a.max_queue, embeddings=a.embeddings,
                                    pooling=a.pooling, embed_batch=a.embed_batch_size,
                                    chat_template=template, deterministic=a.deterministic)

    server = None

    def on_fatal(exc):
        fatal.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(engine_factory=make_engine, api_keys=keys, on_fatal=on_fatal,
                     model_name=a.model_alias or os.path.basename(path),
                     max_body_bytes=a.max_body_size, cors_origins=a.cors_origin or (),
                     prepare_threads=a.prepare_threads, prepare_timeout=a.prepare_timeout)
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level,
                            timeout_graceful_shutdown=a.shutdown_grace, lifespan="on",
                            access_log=not a.no_access_log)
    server = _server_class()(config)
    try:
        server.run()
    finally:
        engine = app.state.llamagen.engine
        if engine is not None:      # the lifespan closed it, unless uvicorn was forced out
            engine.close()
        model.close()
    if fatal:
        raise fatal[0]
    return 0


def _server_class():
    import contextlib

    class Server(uvicorn.Server):
        """uvicorn's server, except that SIGTERM / SIGINT end it with status 0: uvicorn raises
        the signal again after its graceful shutdown, which would kill the process with it."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    self._captured_signals.clear()

    return Server
