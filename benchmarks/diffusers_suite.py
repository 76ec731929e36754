"""Run diffusers' own fast pipeline tests against mmskip's drop-in pipelines (GitHub issue #17).

Usage::

    python benchmarks/diffusers_suite.py PATH_TO_DIFFUSERS_TESTS [--only sd,dit] [--timeout 120]

``PATH_TO_DIFFUSERS_TESTS`` is diffusers' ``tests`` folder, a diffusers checkout that holds one, or
a (bare) git directory of the diffusers repository (its ``HEAD:tests`` is extracted with
``git archive``). diffusers does not ship its tests on PyPI, so this is a script, not a CI test.

What it does
------------
1. Copies the tests into a temporary tree (``--work``, default ``/tmp/mmskip_diffusers_suite``)
   and, beside each parent test file, writes ``test_mmskip_variants_<name>.py`` with two generated
   subclasses of the parent fast-test class (``DiTPipelineFastTests``, ...):

   * ``<Parent>_SkipDisabled``: ``pipeline_class = Skip...Pipeline``, skipping never enabled;
   * ``<Parent>_SkipEnabled``: ``pipeline_class`` is a subclass of ``Skip...Pipeline`` (same
     ``__name__``) whose ``__init__`` -- wrapped with ``functools.wraps`` so diffusers still reads
     the parent's signature for its expected modules and config -- ends with
     ``self.enable_skip(FeatureInheritanceConfig(schedule=interval(2)))`` (a fresh config per
     pipeline). Every pipeline a test builds through ``pipeline_class`` is thus enabled, whether it
     is made with ``pipeline_class(**components)``, ``from_pretrained`` or ``from_pipe``, while the
     test bodies, ``get_dummy_components`` and the component dicts stay diffusers' own. (Wrapping
     ``get_dummy_components`` cannot do it: it returns bare modules and the tests construct the
     pipeline themselves.) A pipeline built without its denoiser (``unet=None`` in the
     ``encode_prompt`` tests) has nothing to enable and stays disabled. Tests that hard-code the
     diffusers class (``StableDiffusionPipeline.from_pretrained(...)``) run the parent class in
     every variant. Each enabled pipeline appends a line to ``<work>/enabled_<suite>.tsv`` (test,
     class, ``skip_enabled``): the report counts them, proof the variant really ran enabled.

   The parent class itself runs unchanged from its own file.
2. Runs each pipeline's three classes in one pytest subprocess (the five suites in sequence, on
   CPU: ``CUDA_VISIBLE_DEVICES=""``), with ``-p no:cacheprovider -q``, a per-test
   ``--timeout`` (pytest-timeout) and ``--junitxml`` for the per-test outcomes (pytest's output goes
   to ``<work>/pytest_<suite>.log``; past ``--suite-timeout`` it is interrupted with SIGINT, which
   still writes the XML). Slow / nightly / accelerator tests skip themselves as in diffusers'
   default run (``RUN_SLOW`` unset). About 12 minutes on 2 CPU cores.
3. Prints and writes (``benchmarks/results/diffusers_suite.{md,json}``) per pipeline the passed /
   failed / skipped counts of the parent and each variant, and every test that passes on the parent
   but fails or is skipped on a variant, with its one-line error, grouped by cause.
4. There is no Hugging Face hub here: the tiny hub repos the five fast tests load
   (``hf-internal-testing/tiny-random-clip``: a CLIP BPE tokenizer with < 1000 ids;
   ``hf-internal-testing/tiny-random-t5``: a T5 config with d_model 32 and a Unigram tokenizer)
   are rebuilt locally in the hub cache layout (``$HF_HOME/hub/models--org--name/snapshots/<hash>``
   plus ``refs/main``) and the tests run with ``HF_HUB_OFFLINE=1``. The stand-ins are not the
   hub's files, so the tests that compare a numeric output slice with hard-coded values, and the
   tests that load other hub repos (full tiny pipelines, real checkpoints), may fail on the parent
   too: judge a Skip variant against the parent's outcome, never against zero failures.

Test dependencies diffusers' test modules import (install with pip if missing): ``pytest``,
``pytest-timeout``, ``parameterized``, ``requests-mock``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("parent", "disabled", "enabled")
VARIANT_TITLES = {
    "parent": "diffusers parent",
    "disabled": "Skip, disabled",
    "enabled": "Skip, FI interval(2)",
}


@dataclass(frozen=True)
class Suite:
    key: str
    title: str
    test_file: str  # relative to the tests folder
    classes: tuple[str, ...]  # candidate names of the fast-test class, first found wins
    skip_pipeline: str  # name in mmskip.pipelines


SUITES = (
    Suite(
        "sd",
        "StableDiffusion",
        "pipelines/stable_diffusion/test_stable_diffusion.py",
        ("StableDiffusionPipelineFastTests", "TestStableDiffusionPipeline"),
        "SkipStableDiffusionPipeline",
    ),
    Suite(
        "sdxl",
        "StableDiffusionXL",
        "pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py",
        ("StableDiffusionXLPipelineFastTests", "TestStableDiffusionXLPipeline"),
        "SkipStableDiffusionXLPipeline",
    ),
    Suite(
        "dit",
        "DiT",
        "pipelines/dit/test_dit.py",
        ("DiTPipelineFastTests", "TestDiTPipeline"),
        "SkipDiTPipeline",
    ),
    Suite(
        "pixart",
        "PixArtAlpha",
        "pipelines/pixart_alpha/test_pixart.py",
        ("PixArtAlphaPipelineFastTests", "TestPixArtAlphaPipeline"),
        "SkipPixArtAlphaPipeline",
    ),
    Suite(
        "sd3",
        "StableDiffusion3",
        "pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py",
        ("StableDiffusion3PipelineFastTests", "TestStableDiffusion3Pipeline"),
        "SkipStableDiffusion3Pipeline",
    ),
)

STANDIN_NOTE = (
    "Hub repos are local stand-ins (tiny-random-clip, tiny-random-t5 rebuilt offline): numeric slice "
    "checks and tests loading other hub repos may fail on the parent too -- compare with the parent, "
    "not with zero failures."
)

# --------------------------------------------------------------------------------------------------
# the diffusers tests: where they come from


def _setup_version(text: str) -> str | None:
    m = re.search(r"""version\s*=\s*["']([^"']+)["']""", text)
    return m.group(1) if m else None


def prepare_tree(source: Path, tree: Path) -> dict:
    """Copy (or ``git archive``) diffusers' ``tests`` into ``tree/tests``; return provenance."""
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    meta: dict = {"source": str(source), "commit": None, "snapshot_version": None}
    source = source.resolve()
    is_git_dir = (
        (source / "HEAD").is_file() and (source / "objects").is_dir() and not (source / "tests").is_dir()
    )
    if is_git_dir:
        git = ["git", f"--git-dir={source}"]
        meta["commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        archive = subprocess.run(
            [*git, "archive", "--format=tar", "HEAD", "tests"], capture_output=True, check=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
        setup = subprocess.run([*git, "show", "HEAD:setup.py"], capture_output=True, text=True)
        if setup.returncode == 0:
            meta["snapshot_version"] = _setup_version(setup.stdout)
        return meta
    tests = source / "tests" if (source / "tests" / "pipelines").is_dir() else source
    if not (tests / "pipelines").is_dir():
        raise SystemExit(
            f"{source}: not diffusers' tests folder, a checkout holding one, or its git directory"
        )
    shutil.copytree(tests, tree / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    setup = tests.parent / "setup.py"
    if setup.is_file():
        meta["snapshot_version"] = _setup_version(setup.read_text())
    head = subprocess.run(
        ["git", "-C", str(tests.parent), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if head.returncode == 0:
        meta["commit"] = head.stdout.strip()
    return meta


def find_class(tests: Path, suite: Suite) -> tuple[Path, str] | None:
    """The suite's fast-test class: in its usual file, else anywhere under ``tests/pipelines``."""
    usual = tests / suite.test_file
    candidates = [usual] if usual.is_file() else []
    candidates += sorted(p for p in (tests / "pipelines").rglob("test_*.py") if p != usual)
    for name in suite.classes:
        for path in candidates:
            text = path.read_text()
            if f"class {name}" not in text:
                continue
            tree = ast.parse(text)
            if any(isinstance(n, ast.ClassDef) and n.name == name for n in tree.body):
                return path, name
    return None


# --------------------------------------------------------------------------------------------------
# offline stand-ins for the tiny hub repos

_WORDS = (
    "a painting of squirrel eating burger photo an astronaut riding horse on mars cat dog sitting "
    "the table with red blue green yellow apple banana in forest city night street car house tree "
    "river mountain sky cloud sun moon star beautiful landscape portrait woman man child old young "
    "small large hot cold french fries example prompt high quality detailed drawing sketch oil "
    "watercolor digital art style realistic cartoon anime fantasy castle dragon knight wizard robot "
    "space ship ocean beach wave sand flower garden rose field snow winter summer spring autumn "
    "light dark shadow bright color black white bird fish bear lion tiger elephant monkey frog "
    "bottle cup glass chair bed window door road bridge tower boat train plane bicycle lamp book "
    "wearing hat coat dress shirt shoes glasses holding playing running flying standing looking "
    "happy sad angry smiling cute funny scary strange ancient modern future city-scape"
).split()


def _clip_vocab(size: int = 1000) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE (``</w>`` word ends) learnt on a small word list, ``size`` ids."""
    from mmskip.zoo.sd_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    chars = list(table.values())
    vocab = chars + [c + "</w>" for c in chars]
    words = Counter()
    for w in _WORDS:
        symbols = [table[b] for b in w.encode()]
        symbols[-1] += "</w>"
        words[tuple(symbols)] += 1
    merges: list[tuple[str, str]] = []
    known = set(vocab)
    while len(vocab) < size - 2:
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        new_words: Counter = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # the highest ids: CLIP pools at argmax(input_ids)
    return {tok: i for i, tok in enumerate(vocab)}, merges


def _snapshot(hub: Path, repo_id: str) -> Path:
    org, name = repo_id.split("/")
    repo = hub / f"models--{org}--{name}"
    revision = hashlib.sha1(f"mmskip-standin:{repo_id}".encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    snap = repo / "snapshots" / revision
    if snap.exists():
        shutil.rmtree(snap)
    snap.mkdir(parents=True)
    return snap


def build_standins(hf_home: Path) -> list[str]:
    """Write the offline hub cache: the repos the five fast tests load by id."""
    from transformers import CLIPTokenizer, T5Config, T5Tokenizer

    hub = hf_home / "hub"
    vocab, merges = _clip_vocab(1000)
    clip = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    clip.save_pretrained(_snapshot(hub, "hf-internal-testing/tiny-random-clip"))

    # tiny-random-t5: the hub config's shape (d_model 32, 5 layers, 4 heads, vocab 1103)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}
    for i, w in enumerate(sorted(set(_WORDS))):
        for piece in ("▁" + w, w):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -3.0 - i / 100))
    for c in sorted({c for w in _WORDS for c in w + w.upper()}):
        for piece in (c, "▁" + c):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -10.0))
    pieces = pieces[:1000]
    t5_tok = T5Tokenizer(vocab=pieces, extra_ids=100, model_max_length=512)
    t5_config = T5Config(
        vocab_size=1103,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=5,
        num_decoder_layers=5,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.1,
        initializer_factor=0.002,
        feed_forward_proj="relu",
        is_encoder_decoder=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        bos_token_id=0,
    )
    t5_snap = _snapshot(hub, "hf-internal-testing/tiny-random-t5")
    t5_tok.save_pretrained(t5_snap)
    t5_config.save_pretrained(t5_snap)
    return ["hf-internal-testing/tiny-random-clip", "hf-internal-testing/tiny-random-t5"]


# --------------------------------------------------------------------------------------------------
# the generated variant classes

SUPPORT = '''"""Generated by mmskip benchmarks/diffusers_suite.py: the Skip-pipeline variants of a test class."""

import functools
import os

from mmskip.diffusion import FeatureInheritanceConfig
from mmskip.schedules import interval


def skip_config():
    return FeatureInheritanceConfig(schedule=interval(2))


def enabled_pipeline_class(skip_cls):
    """A subclass of ``skip_cls`` (same name) whose every instance ends ``__init__`` enabled."""
    base_init = skip_cls.__init__

    @functools.wraps(base_init)  # diffusers reads the expected modules from the signature
    def __init__(self, *args, **kwargs):
        base_init(self, *args, **kwargs)
        # a pipeline built without its denoiser (encode_prompt-only tests) has nothing to enable
        has_denoiser = getattr(self, self._mmskip_denoiser, None) is not None
        if has_denoiser:
            self.enable_skip(skip_config())
        log = os.environ.get("MMSKIP_SUITE_ENABLE_LOG")
        if log:  # proof that the variant's pipelines were enabled: one line per pipeline built
            test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
            state = "enabled" if self.skip_enabled else "NOT_ENABLED" if has_denoiser else "no_denoiser"
            with open(log, "a") as f:
                f.write(f"{test}\\t{type(self).__name__}\\t{state}\\n")

    return type(skip_cls.__name__, (skip_cls,), {"__init__": __init__, "__module__": skip_cls.__module__})


def variant(parent, skip_cls, enabled, name):
    pipeline_class = enabled_pipeline_class(skip_cls) if enabled else skip_cls
    return type(name, (parent,), {"pipeline_class": pipeline_class})
'''

VARIANT_MODULE = '''"""Generated by mmskip benchmarks/diffusers_suite.py: {parent} on mmskip's {skip}."""

from mmskip.pipelines import {skip}

from {dots}_mmskip_support import variant
from . import {module} as _parent_module

{parent}_SkipDisabled = variant(_parent_module.{parent}, {skip}, False, "{parent}_SkipDisabled")
{parent}_SkipEnabled = variant(_parent_module.{parent}, {skip}, True, "{parent}_SkipEnabled")
{parent}_SkipDisabled.__module__ = __name__
{parent}_SkipEnabled.__module__ = __name__
'''


def write_variants(tests: Path, path: Path, parent: str, suite: Suite) -> Path:
    (tests / "_mmskip_support.py").write_text(SUPPORT)
    depth = len(path.relative_to(tests).parts) - 1  # packages between tests/ and the file
    out = path.with_name(f"test_mmskip_variants_{path.stem.removeprefix('test_')}.py")
    out.write_text(
        VARIANT_MODULE.format(
            parent=parent, skip=suite.skip_pipeline, dots="." * (depth + 1), module=path.stem
        )
    )
    return out


# --------------------------------------------------------------------------------------------------
# running and reading the results


def pytest_env(hf_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("RUN_SLOW", "RUN_NIGHTLY", "RUN_COMPILE", "HF_TOKEN", "PYTEST_ADDOPTS"):
        env.pop(k, None)
    env.update(
        HF_HOME=str(hf_home),
        HF_HUB_CACHE=str(hf_home / "hub"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        DISABLE_TELEMETRY="1",
        CUDA_VISIBLE_DEVICES="",
        TOKENIZERS_PARALLELISM="false",
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


def source_digest() -> str:
    """A hash of mmskip's sources (mmskip/, pipelines/, diffusion/): a suite is only as coherent as its
    sources were while it ran."""
    h = hashlib.sha1()
    for folder in ("mmskip", "pipelines", "diffusion"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _one_line(text: str | None, limit: int = 220) -> str:
    for line in (text or "").splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return ""


def _message(el: ET.Element) -> str:
    """The error's first line; when that says little (``AssertionError:``), the traceback's ``E`` lines."""
    first = _one_line(el.get("message"))
    if el.tag == "skipped" or (len(first) > 30 and not first.endswith(":")):
        return first or _one_line(el.text)
    e_lines = [ln[1:].strip() for ln in (el.text or "").splitlines() if ln.startswith("E ")]
    e_lines = [ln for ln in e_lines if ln]
    return _one_line(" ".join(e_lines[:3])) or first


def read_junit(xml: Path) -> dict[str, dict[str, dict]]:
    """``{class name: {test name: {"outcome": passed|failed|error|skipped, "message": ...}}}``."""
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    if not xml.is_file():
        return out
    for case in ET.parse(xml).getroot().iter("testcase"):
        cls = case.get("classname", "").rsplit(".", 1)[-1]
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = _message(el)
                break
        prev = out[cls].get(case.get("name"))
        if prev is not None and prev["outcome"] != "passed" and outcome == "passed":
            continue  # a teardown error reported after the call: keep the failure
        out[cls][case.get("name")] = {
            "outcome": outcome,
            "message": message,
            "time_s": float(case.get("time", 0)),
        }
    return out


def run_suite(tree: Path, tests: Path, suite: Suite, env: dict, args: argparse.Namespace) -> dict:
    found = find_class(tests, suite)
    if found is None:
        return {"error": f"none of {suite.classes} found under {tests / 'pipelines'}"}
    path, parent = found
    variants_file = write_variants(tests, path, parent, suite)
    rel = path.relative_to(tree).as_posix()
    rel_v = variants_file.relative_to(tree).as_posix()
    classes = {"parent": parent, "disabled": f"{parent}_SkipDisabled", "enabled": f"{parent}_SkipEnabled"}
    node_ids = [f"{rel}::{parent}", f"{rel_v}::{classes['disabled']}", f"{rel_v}::{classes['enabled']}"]
    xml = args.work / f"junit_{suite.key}.xml"
    xml.unlink(missing_ok=True)
    enable_log = args.work / f"enabled_{suite.key}.tsv"
    enable_log.unlink(missing_ok=True)
    env = {**env, "MMSKIP_SUITE_ENABLE_LOG": str(enable_log)}
    cmd = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rN", "--color=no",
        "-c", str(tree / "pytest.ini"), "--rootdir", str(tree),
        f"--timeout={args.timeout}", f"--junitxml={xml}", "-o", "junit_family=xunit1",
        *node_ids,
    ]  # fmt: skip
    print(f"[{suite.key}] {parent} from {rel}: {' '.join(node_ids)}", flush=True)
    digest_before = source_digest()
    start = time.perf_counter()
    log = args.work / f"pytest_{suite.key}.log"  # tail -f it to follow the run
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=args.suite_timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # pytest stops and still writes the junit XML so far
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = "suite timeout"
    tail = log.read_text(errors="replace")[-3000:]
    seconds = time.perf_counter() - start
    results = read_junit(xml)
    built = [ln.split("\t") for ln in enable_log.read_text().splitlines()] if enable_log.is_file() else []
    by_variant = {v: results.get(classes[v], {}) for v in VARIANTS}
    summary = _tail_summary(tail)
    print(f"[{suite.key}] pytest rc={rc} in {seconds:.0f} s: {summary}", flush=True)
    if not any(by_variant.values()):
        print(tail, flush=True)
    return {
        "test_file": rel,
        "classes": classes,
        "skip_pipeline": suite.skip_pipeline,
        "pytest_rc": rc,
        "pytest_summary": summary,
        "seconds": round(seconds, 1),
        # pipelines the enabled variant built, all with skip_enabled True: proof the variant is on
        "enabled_pipelines_built": dict(Counter(b[-1] for b in built)),
        "enabled_tests_building_one": len({b[0] for b in built if b[-1] == "enabled"}),
        "sources_before": digest_before,
        "sources_after": source_digest(),
        "tests": by_variant,
    }


def _tail_summary(tail: str) -> str:
    lines = [
        ln.strip("= ") for ln in tail.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)
    ]
    return lines[-1] if lines else _one_line(tail.splitlines()[-1] if tail.strip() else "")


def counts(tests: dict[str, dict]) -> dict[str, int]:
    c = Counter(t["outcome"] for t in tests.values())
    return {
        "passed": c["passed"],
        "failed": c["failed"] + c["error"],
        "skipped": c["skipped"],
        "total": len(tests),
    }


def _cause(message: str) -> str:
    """A message with its numbers and quoted values blanked, to group tests failing for one reason."""
    m = re.sub(r"0x[0-9a-f]+", "0x_", message)
    m = re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "N", m)
    m = re.sub(r"'[^']*'", "'_'", m)
    return m[:140]


def compare(report: dict) -> dict:
    tests = report["tests"]
    parent = tests["parent"]
    out = {}
    for v in ("disabled", "enabled"):
        regressions, improvements = [], []
        for name, res in sorted(tests[v].items()):
            base = parent.get(name)
            if base is None:
                continue
            if base["outcome"] == "passed" and res["outcome"] != "passed":
                regressions.append({"test": name, "outcome": res["outcome"], "message": res["message"]})
            elif base["outcome"] in ("failed", "error") and res["outcome"] == "passed":
                improvements.append({"test": name, "parent_message": base["message"]})
        groups: dict[str, list[str]] = defaultdict(list)
        for r in regressions:
            groups[_cause(r["message"])].append(r["test"])
        out[v] = {"regressions": regressions, "fixed_vs_parent": improvements, "causes": dict(groups)}
    return out


# --------------------------------------------------------------------------------------------------
# the report


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [
        "# diffusers fast pipeline tests on mmskip's Skip pipelines",
        "",
        f"diffusers tests: `{meta['source']}` (commit `{meta['commit']}`, setup.py version "
        f"{meta['snapshot_version']}); installed diffusers {meta['diffusers']}, transformers "
        f"{meta['transformers']}, torch {meta['torch']}; CPU, {meta['cpu_count']} cores; "
        f"{meta['seconds']:.0f} s in all. mmskip: commit {meta['mmskip_commit']} plus the working tree "
        f"(sources hash {meta['mmskip_sources']}).",
        "",
        f"> {STANDIN_NOTE}",
        "",
        "Variants: **parent** = diffusers' class unchanged; **disabled** = `pipeline_class = Skip...Pipeline`, "
        "skipping off; **enabled** = every pipeline built gets "
        "`enable_skip(FeatureInheritanceConfig(schedule=interval(2)))`. Cells: passed / failed / skipped.",
        "",
        "| pipeline | test class | parent | disabled | enabled | pass on parent, not on disabled | "
        "pass on parent, not on enabled | pipelines built enabled (tests) | time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, rep in data["suites"].items():
        if "error" in rep:
            lines.append(f"| {key} | {rep['error']} | | | | | | | |")
            continue
        cells = []
        for v in VARIANTS:
            c = rep["counts"][v]
            cells.append(f"{c['passed']} / {c['failed']} / {c['skipped']}")
        reg = [str(len(rep["compare"][v]["regressions"])) for v in ("disabled", "enabled")]
        b = rep["enabled_pipelines_built"]
        built = f"{b.get('enabled', 0)} ({rep['enabled_tests_building_one']})"
        if b.get("no_denoiser"):
            built += f", {b['no_denoiser']} without denoiser"
        if b.get("NOT_ENABLED"):
            built += f", **{b['NOT_ENABLED']} NOT ENABLED**"
        if rep["sources_before"] != rep["sources_after"]:
            built += ", **mmskip sources changed during the run**"
        lines.append(
            f"| {rep['title']} | `{rep['classes']['parent']}` | {' | '.join(cells)} | {' | '.join(reg)} | {built} "
            f"| {rep['seconds']:.0f} s |"
        )
    lines += [
        "",
        "*Pipelines built enabled*: pipelines the enabled variant built with `skip_enabled` true, and in how "
        "many tests; pipelines built without a denoiser (`encode_prompt` tests) stay disabled.",
        "",
    ]
    for rep in data["suites"].values():
        if "error" in rep:
            continue
        for v in ("disabled", "enabled"):
            cmp = rep["compare"][v]
            if not cmp["regressions"] and not cmp["fixed_vs_parent"]:
                continue
            lines += [f"## {rep['title']}: {VARIANT_TITLES[v]}", ""]
            if cmp["regressions"]:
                lines.append("Pass on the parent, not here (grouped by cause):")
                lines.append("")
                by_name = {r["test"]: r for r in cmp["regressions"]}
                for tests in cmp["causes"].values():
                    first = by_name[tests[0]]
                    lines.append(f"- {first['outcome']}: `{first['message'] or '(no message)'}`")
                    for t in tests:
                        lines.append(f"  - `{t}`")
                lines.append("")
            if cmp["fixed_vs_parent"]:
                lines.append(
                    "Fail on the parent, pass here: "
                    + ", ".join(f"`{t['test']}`" for t in cmp["fixed_vs_parent"])
                )
                lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "tests", type=Path, help="diffusers' tests folder, a checkout holding one, or its git directory"
    )
    ap.add_argument(
        "--only", default="", help="comma-separated suite keys: " + ",".join(s.key for s in SUITES)
    )
    ap.add_argument("--timeout", type=int, default=120, help="per-test timeout, seconds (pytest-timeout)")
    ap.add_argument("--suite-timeout", type=int, default=900, help="per-suite wall-clock limit, seconds")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmskip_diffusers_suite"), help="temporary tree")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for diffusers_suite.{json,md}")
    args = ap.parse_args(argv)

    import diffusers
    import torch
    import transformers

    start = time.perf_counter()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    tree = args.work / "tree"
    meta = prepare_tree(args.tests, tree)
    (tree / "pytest.ini").write_text("[pytest]\naddopts =\n")
    tests = tree / "tests"
    hf_home = args.work / "hf_home"
    shutil.rmtree(hf_home, ignore_errors=True)
    standins = build_standins(hf_home)
    meta.update(
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        torch=torch.__version__,
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        hub_standins=standins,
        skip_config="FeatureInheritanceConfig(schedule=interval(2))",
        per_test_timeout_s=args.timeout,
        note=STANDIN_NOTE,
        mmskip_commit=subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        mmskip_sources=source_digest(),
    )
    print(f"diffusers tests from {meta['source']} (commit {meta['commit']}, setup.py version {meta['snapshot_version']}); "
          f"installed diffusers {meta['diffusers']}", flush=True)  # fmt: skip
    print(STANDIN_NOTE, flush=True)
    env = pytest_env(hf_home)
    only = {k for k in args.only.split(",") if k}
    suites = {}
    for suite in SUITES:
        if only and suite.key not in only:
            continue
        rep = run_suite(tree, tests, suite, env, args)
        rep["title"] = suite.title
        if "error" not in rep:
            rep["counts"] = {v: counts(rep["tests"][v]) for v in VARIANTS}
            rep["compare"] = compare(rep)
        suites[suite.key] = rep
    meta["seconds"] = round(time.perf_counter() - start, 1)
    data = {"meta": meta, "suites": suites}
    md = markdown(data)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "diffusers_suite.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "diffusers_suite.md").write_text(md)
    print()
    print(md)
    print(f"wrote {args.out / 'diffusers_suite.json'} and {args.out / 'diffusers_suite.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
