"""A real `dsv4 serve` on loopback for the server and web-page tests: a tiny random model with a tokenizer trained on a
few standard-library files, started as a subprocess on a free port."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from dsv4 import save_pretrained
from dsv4.tokenizers.text import Tokenizer
from tests.helpers import random_model
from tests.test_data import FEW

API_KEY = "test-key"
MODEL = "tiny-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(path: Path) -> Path:
    save_pretrained(random_model(0), path)
    Tokenizer.train((p.read_text() for p in FEW), vocab_size=512, n_vis=4).save(path / "tokenizer.json")
    return path


class Server:
    def __init__(self, ckpt: Path, *args: str, api_key: str | None = API_KEY, startup_s: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "dsv4", "serve", "--ckpt", str(ckpt), "--port", str(self.port),
               "--model-name", MODEL, "--max-len", "2048", "--dtype", "fp32", "--no-compile", *args]
        env = {**os.environ, "DSV4_API_KEY": api_key or ""}
        if api_key is None:
            env.pop("DSV4_API_KEY")
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_s
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


def serving(ckpt: Path):
    """A fixture's body: the running server's base URL (API key `API_KEY`, model `MODEL`); stopped with SIGTERM
    after the module."""
    server = Server(ckpt, "--max-batch", "8")
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def live_server(server_ckpt):
    yield from serving(server_ckpt)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_CALL = ("get_weather", '{"city": "Paris"}')


def tool_calling_checkpoint(path: Path, steps: int = 120) -> Path:
    """A tiny model taught (by overfitting, a few seconds) to answer WEATHER_QUESTION, asked with WEATHER_TOOL, by
    calling the tool in DeepSeek's markup: a real model whose output the server must parse into tool_calls."""
    import torch

    from dsv4.serve.prompts import chat_prompt
    from dsv4.serve.protocol import ChatCompletionRequest
    from dsv4.serve.tools import render_calls

    tiny_checkpoint(path)
    tok = Tokenizer.from_file(path / "tokenizer.json")
    model = random_model(0).train()
    request = ChatCompletionRequest(model=MODEL, messages=WEATHER_QUESTION, tools=[WEATHER_TOOL])
    prompt = chat_prompt(tok, request)
    ids = torch.tensor([prompt + tok.encode(render_calls([WEATHER_CALL])) + [tok.eos_id]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[0, len(prompt) - 1:], ids[0, len(prompt):])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_pretrained(model.eval(), path)
    return path


def tiny_multimodal_checkpoint(path: Path) -> Path:
    """`tiny_checkpoint`'s tokenizer with a random pixel tokenizer and a random tiny model of the joint vocabulary:
    what `dsv4 multimodal` writes, untrained (the server's image and video endpoints and the web page only need the
    shapes)."""
    import dataclasses
    import json

    import torch

    from dsv4.tokenizers.multimodal import VisualVocab
    from dsv4.tokenizers.pixels import PixelArgs, PixelTokenizer, save_pixels

    tok = Tokenizer.train((p.read_text() for p in FEW), vocab_size=512, n_vis=4)
    torch.manual_seed(0)
    pixels = PixelTokenizer(PixelArgs(width=8)).eval()
    vocab = VisualVocab.build(tok, pixels.fsq.codebook_size, pixels.args.grid ** 2)
    save_pretrained(random_model(0, vocab_size=vocab.size), path)
    tok.save(path / "tokenizer.json")
    (path / "pixels").mkdir()
    save_pixels(pixels, path / "pixels")
    (path / "multimodal.json").write_text(json.dumps(dataclasses.asdict(vocab)))
    return path


@pytest.fixture(scope="module")
def mm_ckpt(tmp_path_factory) -> Path:
    return tiny_multimodal_checkpoint(tmp_path_factory.mktemp("mm"))


@pytest.fixture(scope="module")
def mm_server(mm_ckpt):
    """`live_server` for the tiny multimodal checkpoint: the image and video endpoints on."""
    yield from serving(mm_ckpt)
