"""A real OpenAI-compatible vLLM server with mmskip self-speculation: started on 127.0.0.1,
queried with the ``openai`` client (completions, chat, streaming, a stream cancelled mid-way),
stopped; greedy text equals plain vLLM's. A bad mmskip config stops the server while it parses
its arguments, with the config's own one-line message."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests_vllm.support import NEW_TOKENS, START_TIMEOUT, start_server, stop_server, wait_ready

SPEC = {"method": "custom_class", "model": "mmskip_vllm.SelfSpeculativeProposer", "num_speculative_tokens": 4}

def _flags(draft: dict) -> list[str]:
    return ["--hf-overrides", json.dumps({"mmskip_draft": draft}), "--speculative-config", json.dumps(SPEC)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    proc, port, log = start_server(_flags({"exit_layer": 8}), tmp_path_factory.mktemp("server"))
    try:
        wait_ready(proc, port, log)
        yield port
    finally:
        stop_server(proc)
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
    proc, _, log = start_server(_flags({"exit_layer": 99}), tmp_path)
    try:
        proc.wait(timeout=START_TIMEOUT)
    finally:
        stop_server(proc)
    assert proc.returncode != 0
    text = log.read_text()
    # refused while parsing the config: one traceback, in the API server process, ending in the message
    assert text.strip().splitlines()[-1] == (
        "mmskip_vllm.errors.DraftConfigError: mmskip_draft.exit_layer must be an int in 1..23 "
        "(the served model has 24 layers), got 99")
    assert text.count("Traceback (most recent call last)") == 1
