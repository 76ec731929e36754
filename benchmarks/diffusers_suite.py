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
import hashlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

import harness
from _diffusers_suite_cases import (
    STANDIN_NOTE,
    SUITES,
    VARIANT_TITLES,
    VARIANTS,
    Suite,
    build_standins,
    find_class,
    prepare_tree,
    write_variants,
)

ROOT = Path(__file__).resolve().parents[1]

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
    ap.add_argument("--out", type=Path, default=harness.RESULTS, help="folder for diffusers_suite.{json,md}")
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
    print()
    print(md)
    harness.write(args.out / "diffusers_suite.json", data, md, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
