"""What ``diffusers_suite.py`` runs: the suites, the diffusers test tree, offline hub stand-ins, generated variants.

Each :class:`Suite` names a diffusers fast-test file, its test class and mmskip's drop-in pipeline;
:func:`prepare_tree` extracts diffusers' tests into a work tree; :func:`build_standins` rebuilds the
tiny hub repos the fast tests load (no hub here); :func:`write_variants` writes the two generated
subclasses of a parent test class (Skip pipeline disabled, and enabled with feature inheritance).
"""

from __future__ import annotations

import ast
import hashlib
import io
import re
import shutil
import subprocess
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

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
