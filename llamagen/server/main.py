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
from llamagen.adapters import control_vector_from, load_loras
from llamagen.adapters import flag_specs as adapter_flags
from llamagen.speculative import from_flags


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
    # (a bad --spec-* flag: before the model loads; the draft model loads first)
    speculative = from_flags(a, load_model=lambda p: llamagen.Model(p, n_gpu_layers=a.n_gpu_layers))
    loras, cvecs, cvec_layers, lora_init_without_apply = adapter_flags(a)
    if a.slot_save_path is not None and not os.path.isdir(a.slot_save_path):
        raise ValueError(f"--slot-save-path {a.slot_save_path!r}: no such folder")
    if a.cache_ram < -1:
        raise ValueError(f"--cache-ram must be -1 (no limit), 0 (off) or MiB, got {a.cache_ram}")
    model = llamagen.Model(path, n_gpu_layers=a.n_gpu_layers)
    if template is not None:
        try:
            model.chat_template_source(template)
        except (ValueError, TypeError) as e:
            model.close()
            raise ValueError(f"the chat template: {e}") from None
    try:
        # (a bad adapter file: a one-line error before the port is bound)
        loras = load_loras(model, loras)
        cvec = control_vector_from(cvecs)
    except (OSError, ValueError, TypeError) as e:
        model.close()
        raise ValueError(str(e)) from None
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
                                    chat_template=template, deterministic=a.deterministic,
                                    speculative=speculative, type_k=a.cache_type_k,
                                    type_v=a.cache_type_v, lora=loras,
                                    lora_apply=not lora_init_without_apply,
                                    control_vector=cvec, control_vector_layers=cvec_layers,
                                    cache_ram_mib=a.cache_ram)

    server = None

    def on_fatal(exc):
        fatal.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(engine_factory=make_engine, api_keys=keys, on_fatal=on_fatal,
                     model_name=a.model_alias or os.path.basename(path),
                     max_body_bytes=a.max_body_size, cors_origins=a.cors_origin or (),
                     prepare_threads=a.prepare_threads, prepare_timeout=a.prepare_timeout,
                     max_request_sequences=a.max_request_sequences,
                     request_window=a.request_window,
                     slot_save_path=a.slot_save_path)
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level,
                            timeout_graceful_shutdown=a.shutdown_grace, lifespan="on",
                            access_log=not a.no_access_log, http=_protocol(a.header_timeout),
                            timeout_keep_alive=a.timeout_keep_alive,
                            limit_concurrency=a.max_connections)
    server = _server_class()(config)
    server.llamagen_app = app
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


def _protocol(header_timeout: float):
    """uvicorn's h11 protocol with a deadline for a request's headers: uvicorn closes idle
    keep-alive connections, but one that connects and never sends (or never finishes) its headers
    would stay open for good (200 of 200 were still open after 65 s, issue 35)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data):
            super().data_received(data)
            if self.cycle is None or self.cycle.response_complete:
                if self._header_timer is None and not self.transport.is_closing():
                    self._arm()         # bytes of a next request: its headers have a deadline
            else:
                self._disarm()          # its headers came: the route has the request now

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self):
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self):
            self._header_timer = None
            if (self.cycle is None or self.cycle.response_complete) and \
                    not self.transport.is_closing():
                self.transport.close()

    return Protocol


def _server_class():
    import asyncio
    import contextlib

    class Server(uvicorn.Server):
        """uvicorn's server, except that SIGTERM / SIGINT end it with status 0 (uvicorn raises
        the signal again after its graceful shutdown, which would kill the process with it), and
        that requests still running near the end of the grace period end cleanly: the engine is
        closed, so streams get an error event and their end, and waiting requests a 503, before
        uvicorn would cancel them mid-response."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    self._captured_signals.clear()

        async def shutdown(self, sockets=None):
            grace = self.config.timeout_graceful_shutdown
            closer = None
            if grace is not None:
                closer = asyncio.ensure_future(self._close_engine_at(max(0.0, grace - min(
                    1.0, grace / 2))))
            try:
                await super().shutdown(sockets)
            finally:
                if closer is not None:
                    closer.cancel()

        async def _close_engine_at(self, delay: float):
            await asyncio.sleep(delay)
            app = getattr(self, "llamagen_app", None)
            engine = getattr(getattr(app, "state", None), "llamagen", None)
            engine = getattr(engine, "engine", None)
            if engine is not None:
                await asyncio.get_running_loop().run_in_executor(None, engine.close)

    return Server
