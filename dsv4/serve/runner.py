"""The engine on a thread of its own, fed by asyncio handlers.

One thread owns the engine and calls `step()` while there is work (continuous batching: requests join and leave
between steps). Handlers submit from the event loop; each request's deltas come back through an asyncio queue.
A handler that stops listening (a client that disconnected) cancels its requests, which frees their cache slots at
the next step. A failing step fails the requests it ran, not the thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from dsv4.engine.engine import Engine
from dsv4.engine.request import Request

log = logging.getLogger("dsv4.serve")


class EngineError(RuntimeError):
    """The engine failed while running a request."""


class ShuttingDown(RuntimeError):
    """The server is stopping and takes no new requests."""


class EngineRunner:
    CANCEL_WAIT = 5.0  # seconds `stop` waits for a step to report the cancelled requests
    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Event()
        self._stopping = False
        self.draining = False  # set by `stop`: submissions are refused from then on
        self._thread = threading.Thread(target=self._loop, name="dsv4-engine", daemon=True)
        # each live request's (event loop, queue, index), to fail it if a step raises
        self._live: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
        self.step_seconds = 0.0  # time spent in engine steps (for /metrics)

    def start(self) -> EngineRunner:
        """Drive the engine from a thread of its own (what tests and embedders use; see `run` for the CLI)."""
        self._thread.start()
        return self

    def run(self):
        """Drive the engine from the calling thread until `stop`. `dsv4 serve` runs it on the main thread, with the
        HTTP server on another: OpenMP keeps its worker threads spinning (fast) only while it manages no more
        threads than there are cores, and a second thread running torch ops makes it throttle them (measured: a
        small decode step 5.6 -> 33-44 ms compiled, 23 -> 40 ms eager, on 2 cores)."""
        self._thread = None
        self._loop()

    def stop(self, timeout: float = 30.0):
        """Refuse new requests, let running ones finish (up to `timeout` seconds), then cancel what is left, wait for
        the loop to report them cancelled (so every stream ends with its last delta) and stop the loop. Safe to call
        more than once and from any thread (`dsv4 serve` calls it on SIGTERM, and the app again at shutdown)."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.engine.has_work() and time.monotonic() < deadline and self._loop_alive():
            time.sleep(0.05)
        for r in list(self.engine.running) + list(self.engine.waiting):
            self.engine.cancel(r.id)
        self._wake.set()
        deadline = time.monotonic() + self.CANCEL_WAIT
        while self.engine.has_work() and time.monotonic() < deadline and self._loop_alive():
            time.sleep(0.02)
        self._stopping = True
        self._wake.set()
        if self._thread is not None and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _loop_alive(self) -> bool:
        """Whether a loop is (or will be) stepping the engine: `run` on a caller's thread, or the `start`ed thread."""
        return not self._stopping and (self._thread is None or self._thread.is_alive())

    @property
    def queue_depth(self) -> int:
        return len(self.engine.waiting)

    @property
    def running(self) -> int:
        return len(self.engine.running)

    def _loop(self):
        engine = self.engine
        while not self._stopping:
            if not engine.has_work():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            t = time.perf_counter()
            try:
                engine.step()
            except Exception as e:  # noqa: BLE001  (a bad step must not take the server down)
                log.exception("engine step failed")
                self._fail_all(e)
            self.step_seconds += time.perf_counter() - t

    def _fail_all(self, error: Exception):
        for r in self.engine.abort_all():
            live = self._live.pop(r.id, None)
            if live is not None:
                loop, queue, index = live
                loop.call_soon_threadsafe(queue.put_nowait, (index, EngineError(f"the engine failed: {error}")))

    def submit(self, prompt: list[int], queue: asyncio.Queue, index: int, **submit) -> Request:
        """Submit one request (keywords as `Engine.submit`; ValueError if it is refused) -> it. Its deltas arrive
        in `queue` as (index, Delta) from the event loop running this call; a failed step sends (index, EngineError).
        Whoever submits must `cancel` what has not finished when it stops listening."""
        if self.draining:
            raise ShuttingDown("the server is shutting down and takes no new requests")
        loop = asyncio.get_running_loop()
        req = self.engine.submit(prompt, callback=lambda d: loop.call_soon_threadsafe(queue.put_nowait, (index, d)),
                                 **submit)
        self._live[req.id] = (loop, queue, index)
        self._wake.set()
        return req

    def finished(self, request_id: int):
        self._live.pop(request_id, None)

    def cancel(self, request_id: int):
        """Cancel a request (a no-op once it finished); its slot frees at the next step."""
        if self._live.pop(request_id, None) is not None:
            self.engine.cancel(request_id)
            self._wake.set()
