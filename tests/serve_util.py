"""A real `dsv4 serve` on loopback for the server and web-page tests: a tiny random model with a tokenizer trained on a
few standard-library files, started as a subprocess on a free port."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dsv4.tokenizer import Tokenizer
from tests.helpers import random_model
from tests.test_data import FEW

API_KEY = "test-key"
MODEL = "tiny-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(path: Path) -> Path:
    random_model(0).save_pretrained(path)
    Tokenizer.train((p.read_text() for p in FEW), vocab_size=512, n_vis=4).save(path / "tokenizer.json")
    return path


class Server:
    def __init__(self, ckpt: Path, *args: str, api_key: str | None = API_KEY):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "dsv4", "serve", "--ckpt", str(ckpt), "--port", str(self.port),
               "--model-name", MODEL, "--max-len", "2048", "--dtype", "fp32", *args]
        env = {**os.environ, "DSV4_API_KEY": api_key or ""}
        if api_key is None:
            env.pop("DSV4_API_KEY")
        self.log = open(ckpt / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dsv4 serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"dsv4 serve did not come up:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the graceful path
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server_ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def live_server(server_ckpt):
    """The running server's base URL (API key `API_KEY`, model `MODEL`); stopped with SIGTERM after the module."""
    server = Server(server_ckpt, "--max-batch", "8")
    yield server.url
    server.stop()
