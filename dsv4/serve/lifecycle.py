"""`dsv4 serve`: a checkpoint served over HTTP until SIGTERM or Ctrl-C.

HTTP (uvicorn) runs on a thread, the engine on the main thread (see EngineRunner.run: OpenMP throttles its workers
when a second thread runs torch ops). SIGTERM / Ctrl-C ask uvicorn to shut down and drain the runner at once: running
requests get `drain_timeout` seconds to finish, then are cancelled, so that every stream ends with a last chunk
(finish_reason "cancelled") and [DONE] before uvicorn gives up on its connections. Then `serve` returns.
"""

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import uvicorn

from dsv4.engine.engine import Engine
from dsv4.engine.load import load_engine, load_model
from dsv4.engine.visual import VisualModel, read_vocab
from dsv4.serve.app import create_app
from dsv4.serve.runner import EngineRunner
from dsv4.tokenizers.pixels import load_pixels

DEFAULT_MAX_LEN = 8192  # the cache's context per sequence unless max_len says otherwise


def open_engine(ckpt: str | os.PathLike, max_len: int | None, max_batch: int, device: str | None, dtype: str,
                compile: bool | str, speculative: bool | None, device_map=None, prefix_cache_gb: float = 0.0,
                max_step_tokens: int | None = None) -> Engine:
    """The engine, its step graphs compiled now (when compiling) rather than while the first clients wait. A
    multimodal checkpoint's engine runs without speculation (its visual spans are constrained). device_map: see
    dsv4.engine.load.load_model ("auto" plans for max_batch sequences of max_len tokens)."""
    model, tok = load_model(ckpt, device, dtype, device_map=device_map, max_len=max_len or DEFAULT_MAX_LEN,
                            max_batch=max_batch)
    if (Path(ckpt) / "multimodal.json").exists():
        if speculative:
            raise ValueError("a multimodal checkpoint is served without speculation (its spans are constrained)")
        speculative = False
    engine = load_engine(model, tok, max_len=max_len or DEFAULT_MAX_LEN, max_batch=max_batch, compile=compile,
                         speculative=speculative, prefix_cache_gb=prefix_cache_gb, max_step_tokens=max_step_tokens)
    return engine


def visual_side(ckpt: str | os.PathLike, engine: Engine) -> VisualModel | None:
    """A multimodal checkpoint's vocabulary and pixel tokenizer around the engine's model (None: text only)."""
    if not (Path(ckpt) / "multimodal.json").exists():
        return None
    device = engine.device  # the model's main device (placed or not)
    return VisualModel(engine.model, engine.tokenizer, read_vocab(ckpt), load_pixels(Path(ckpt) / "pixels", device))


def http_server(app, host: str, port: int, drain: float) -> uvicorn.Server:
    # uvicorn waits this long for open connections at shutdown, then cancels their handlers (a traceback per stream):
    # longer than the drain, so that every stream has ended by then
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                         timeout_graceful_shutdown=drain + EngineRunner.CANCEL_WAIT + 3))


def stop_on_signals(server: uvicorn.Server, runner: EngineRunner, drain: float):
    """SIGTERM and SIGINT: uvicorn stops taking connections, the runner drains (on a thread: the handler runs on
    the main thread, which the runner's loop must keep)."""
    def shut_down(*_):
        server.should_exit = True
        threading.Thread(target=runner.stop, args=(drain,), name="dsv4-drain", daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, shut_down)


def start_http(server: uvicorn.Server, runner: EngineRunner) -> threading.Thread:
    def serve_http():
        try:
            server.run()
        finally:  # also when it could not start (port taken): the engine loop must not outlive it
            runner.stop(timeout=0)

    http = threading.Thread(target=serve_http, name="dsv4-http")
    http.start()
    return http


def serve(ckpt: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, model_name: str | None = None, drain_timeout: float = 7.0, max_len: int | None = None,
          device: str | None = None, dtype: str = "auto", compile: bool | str = False,
          speculative: bool | None = None, device_map=None, prefix_cache_gb: float = 0.0,
          max_step_tokens: int | None = None) -> int:
    """Serve the checkpoint (the OpenAI API, /health, /metrics, the web page) on host:port until SIGTERM / Ctrl-C,
    with `max_batch` cache slots of `max_len` tokens (default 8192); clients name the model `model_name` (default:
    the checkpoint directory's name). Must run on the main thread (signal handlers) -> 0."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine = open_engine(ckpt, max_len, max_batch, device, dtype, compile, speculative, device_map, prefix_cache_gb,
                         max_step_tokens)
    visual = visual_side(ckpt, engine)
    name = model_name or Path(ckpt).resolve().name
    runner = EngineRunner(engine)
    drain = max(drain_timeout, 0.0)
    server = http_server(create_app(engine, name, api_key=api_key, runner=runner, shutdown_timeout=drain,
                                    visual=visual), host,
                         port, drain)
    stop_on_signals(server, runner, drain)
    http = start_http(server, runner)
    print(f"dsv4 serve: {name} on http://{host}:{port}  (context {engine.max_len} tokens, {max_batch} sequences at "
          f"once{', API key required' if api_key else ''}{', images and clips too' if visual else ''})",
          file=sys.stderr)
    runner.run()  # until the signal handler or the HTTP thread stops it
    http.join()
    return 0
