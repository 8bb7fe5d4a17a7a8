"""mlx_lm.server on a converted ParaRNN folder, on loopback only: concurrent requests (which the server batches)
answer the same greedy text and log-probabilities as generating each prompt alone, and so do later requests
served from the prompt cache those batches filled; the chat endpoint uses the folder's chat template. The
server is a child process with a bounded lifetime, stopped by the test."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_lm.generate import generate_step  # noqa: E402

from pararnn_convert.cli import main as convert_main  # noqa: E402
from pararnn_mlx.loader import load  # noqa: E402
from tests.lm_helpers import tiny_checkpoint  # noqa: E402

HOST = "127.0.0.1"
PROMPTS = ["d", "def add(a, b):", "class Point:\n    x: int = 0\n", "return a + b" * 8]
MAX_TOKENS = 16
STARTUP_SECONDS = 120
REQUEST_SECONDS = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _post(port, path, body):
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=REQUEST_SECONDS) as response:
        return json.loads(response.read())


def _complete(port, prompt):
    reply = _post(port, "/v1/completions", {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0})
    return reply["choices"][0]["text"]


def _complete_with_logprobs(port, prompt):
    """(text, top-5 log-probabilities per token): a tiny random model's greedy text hardly depends on its
    state, its log-probabilities do."""
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "logprobs": True, "top_logprobs": 5}
    choice = _post(port, "/v1/completions", body)["choices"][0]
    steps = choice["logprobs"]["content"]
    return choice["text"], np.array([sorted(top["logprob"] for top in step["top_logprobs"]) for step in steps])


def _alone(model, tokenizer, prompt):
    """The same as _complete_with_logprobs, generated in this process without batching or prompt cache."""
    tokens, top = [], []
    for token, logprobs in generate_step(mx.array(tokenizer.encode(prompt)), model, max_tokens=MAX_TOKENS):
        tokens.append(int(token))
        top.append(np.sort(np.array(logprobs))[-5:])
        if token in tokenizer.eos_token_ids:
            break
    return tokenizer.decode([t for t in tokens if t not in tokenizer.eos_token_ids]), np.array(top)


def _same(served, alone):
    return served[0] == alone[0] and served[1].shape == alone[1].shape and np.allclose(served[1], alone[1],
                                                                                          atol=1e-3)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    tiny_checkpoint(root / "torch", cell="lstm")
    assert convert_main(["to-mlx", "--model", str(root / "torch"), "--out", str(root / "mlx"), "--dtype",
                         "float32"]) == 0
    port = _free_port()
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm", "server", "--model", str(root / "mlx"), "--trust-remote-code",
         "--host", HOST, "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}/v1/models", timeout=5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log_text = (root / "server.log").read_text()[-2000:]
                    raise RuntimeError(f"mlx_lm.server did not start: {log_text}") from None
                time.sleep(0.5)
        yield port, root / "mlx"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)
        log.close()


def test_concurrent_requests_answer_like_each_prompt_alone(server):
    port, folder = server
    model, tokenizer = load(folder)
    alone = [_alone(model, tokenizer, p) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # first, while the server's prompt cache is empty
        concurrent = list(pool.map(lambda p: _complete_with_logprobs(port, p), PROMPTS))
    sequential = [_complete_with_logprobs(port, p) for p in PROMPTS]  # now from the states the batch cached
    for prompt, want, got_concurrent, got_sequential in zip(PROMPTS, alone, concurrent, sequential):
        assert _same(got_concurrent, want), prompt
        assert _same(got_sequential, want), prompt


def test_chat_endpoint_uses_the_byte_tokenizers_template(server):
    server, _ = server
    messages = [{"role": "user", "content": "def add(a, b):"}]
    reply = _post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": MAX_TOKENS,
                                                    "temperature": 0.0})
    assert reply["choices"][0]["message"]["content"] == _complete(server, "user: def add(a, b):\nassistant:")
