"""Run transformers' own Llama and Qwen2 model + generation tests with each mmskip technique applied (issue #19).

Usage::

    python benchmarks/transformers_suite.py PATH_TO_TRANSFORMERS_TESTS [--only llama,qwen2]
        [--variants layer_skip_decode,swift] [-k greedy] [--timeout 120] [--workers 1]

``PATH_TO_TRANSFORMERS_TESTS`` holds transformers' ``tests`` (or is it): ``ModelTesterMixin``
(``test_modeling_common.py``), ``GenerationTesterMixin`` (``generation/test_utils.py``) and
``models/{llama,qwen2}/test_modeling_*.py``. transformers ships no tests on PyPI: this is a script, not a CI test.

The run of record (``/tmp/tf_tests``): the transformers 5.24.0 sdist's ``tests/*.py`` unchanged; what the sdist
lacks (``causal_lm_tester.py``, ``generation/test_utils.py``, ``exporters/test_export.py``,
``utils/test_configuration_utils.py`` + ``tiny_model_summary.json``, ``utils/test_module/``,
``models/{llama,qwen2}/``, ``__init__.py`` files) from upstream commit ``decba1d2ea4ed3cbf0495d1828abad4b2dba1846``
(2026-08-19), the newest reachable copy; and two shims, not transformers files: a root ``conftest.py`` restoring
``testing_utils._TEXT_MODEL_TESTER_DEFAULTS`` (that commit's values; gone in 5.24.0) and
``tests/distributed_testing_utils.py`` (the sdist's FSDP/TP mixins import it; device helpers copied from that
commit, the multi-process launchers skip). The JSON records every file's git blob hash.

1. Copies the tests into ``--work``/tree and writes beside each parent test file ``test_mmskip_variants_<model>.py``:
   one subclass of the parent class per variant (``LlamaModelTest_swift``, ...) in which every model class the
   parent uses (``all_model_classes``, the model tester's ``base_model_class`` / ``causal_lm_class`` / ...,
   ``pipeline_model_mapping``, ``_torch_compile_train_cls``) is a subclass with the same ``__name__`` whose
   ``__init__`` ends with ``mmskip.apply(self, <fresh config>)``, so ``model_class(config)`` and
   ``from_pretrained`` both apply it. A class mmskip does not support (``UnsupportedModelError``), or one without
   an LM head that the technique refuses, stays unmodified. Each test's models (class, status, units skipped,
   SWIFT fallbacks) go to ``<work>/models_<suite>_<variant>.tsv``: proof the variant ran.
2. A pre-flight builds a 2-layer Llama through the same wrapper per variant and checks 4 generated tokens skip.
3. Runs the parent class and each variant class in its own pytest subprocess (``CUDA_VISIBLE_DEVICES=""``,
   ``HF_HUB_OFFLINE=1``, ``--timeout`` per test, ``--junitxml``; log: ``<work>/pytest_<suite>_<variant>.log``).
4. Prints and writes ``benchmarks/results/transformers_suite.{md,json}``: passed / failed / skipped per suite and
   variant, and each test passing on the parent but not on a variant, as an inherent difference (``INHERENT``:
   pattern -> reason) or breakage (everything else), grouped by cause.

Test deps: pytest, pytest-timeout, parameterized, httpx (pytest-xdist for ``--workers``). ~1 min per run, 2 CPUs.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

import harness
from _transformers_suite_sources import (  # noqa: F401  (the script's API)
    SUITES,
    VARIANTS,
    prepare_tree,
    support_source,
    variant_source,
    write_variants,
)

ROOT = Path(__file__).resolve().parents[1]
TESTS_COMMIT = "decba1d2ea4ed3cbf0495d1828abad4b2dba1846"

# Failures inherent to skipping: regex searched in "<variant>::<test name>" -> reason. Everything else is breakage.
INHERENT: dict[str, str] = {
    r"^layer_skip_all::test_training_gradient_checkpointing": "phase='all' skips the top layer for every token: "
    "it takes no part in the loss, so its parameters get no gradient",
    r"^layer_skip_all::test_sliding_window_mask$": "phase='all' skips the top layer on the prompt too: its "
    "output_attentions entry is mmskip's documented all-zero map, which the test reads as 'all masked'",
    r"^void_layers::test_generate_compile_model_forward_fullgraph$": "void layers pick the skip set from each "
    "prompt; the test's two prompts pick different sets, and a compiled graph specializes on its set (the guard "
    "on plan.skip), so the second prompt compiles its own graph",
}

def preflight(tests: Path, variants: list[str]) -> dict[str, str]:
    """Build a 2-layer Llama through the tests' wrapper per variant, generate 4 tokens, report what it skipped."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = importlib.util.spec_from_file_location("_mmskip_support_preflight", tests / "_mmskip_support.py")
    support = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(support)
    config = LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, pad_token_id=0)  # fmt: skip
    out = {}
    for v in variants:
        support.HANDLES.clear()
        try:
            torch.manual_seed(0)
            model = support.wrap(LlamaForCausalLM, v, {})(config).eval()
            ids = torch.randint(3, 99, (1, 7))
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
            handle = support.HANDLES[0][2]
            skipped = {k: s for k, s in handle.counts.skipped.items() if s}
            out[v] = f"skipped {skipped}" if skipped else "NOTHING SKIPPED"
        except Exception as e:  # noqa: BLE001 - reported, not raised: the suite still runs
            out[v] = f"error: {type(e).__name__}: {_one_line(str(e))}"
        print(f"[preflight] {v}: {out[v]}", flush=True)
    return out


def pytest_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RUN_SLOW", "RUN_NIGHTLY", "HF_TOKEN", "PYTEST_ADDOPTS")}
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false", PYTHONDONTWRITEBYTECODE="1")  # fmt: skip
    return env


def _one_line(text: str | None, limit: int = 200) -> str:
    line = next((ln.strip() for ln in (text or "").splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _message(el: ET.Element) -> str:
    first = _one_line(el.get("message"))
    if el.tag == "skipped" or (len(first) > 30 and not first.endswith(":")):
        return first or _one_line(el.text)
    e_lines = [ln[1:].strip() for ln in (el.text or "").splitlines() if ln.startswith("E ") and ln[1:].strip()]
    return _one_line(" ".join(e_lines[:3])) or first


_RANK = {"error": 3, "failed": 3, "passed": 2, "skipped": 1}


def read_junit(xml: Path) -> dict[str, dict]:
    """``{test name: {"outcome": passed|failed|error|skipped, "message": ...}}``; repeated entries (subtests,
    teardown errors) keep the worst outcome."""
    out: dict[str, dict] = {}
    if not xml.is_file():
        return out
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome, message = {"failure": "failed"}.get(tag, tag), _message(el)
                break
        name, prev = case.get("name", ""), out.get(case.get("name", ""))
        if prev is None or _RANK[outcome] > _RANK[prev["outcome"]]:
            out[name] = {"outcome": outcome, "message": message}
    return out


def source_digest() -> str:
    """Hash of mmskip's sources: others may edit them while a suite runs."""
    h = hashlib.sha1()
    for path in sorted((ROOT / "mmskip").rglob("*.py")):
        h.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
    return h.hexdigest()[:12]


def run_pytest(tree: Path, node: str, tag: str, args: argparse.Namespace) -> dict:
    xml, log, models = (args.work / f"{kind}_{tag}.{ext}" for kind, ext in
                        (("junit", "xml"), ("pytest", "log"), ("models", "tsv")))  # fmt: skip
    xml.unlink(missing_ok=True)
    models.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rN", "--color=no",
           "-c", str(tree / "pytest.ini"), "--rootdir", str(tree), f"--timeout={args.timeout}",
           f"--junitxml={xml}", "-o", "junit_family=xunit1", node]  # fmt: skip
    if args.k:
        cmd += ["-k", args.k]
    if args.workers > 1:
        cmd += ["-n", str(args.workers)]
    start, digest = time.perf_counter(), source_digest()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tree, env={**pytest_env(), "MMSKIP_SUITE_LOG": str(models)},
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            rc = proc.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # pytest stops and still writes the junit XML so far
            try:
                rc = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
            rc = f"run timeout ({rc})"
    tail = log.read_text(errors="replace")[-2000:]
    sums = [ln.strip("= ") for ln in tail.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
    rows = [ln.split("\t") for ln in models.read_text().splitlines()] if models.is_file() else []
    fallbacks: Counter = Counter()
    for r in rows:
        fallbacks.update(json.loads(r[4]) if len(r) > 4 else {})
    built = {
        "models": dict(Counter(r[2] for r in rows)),
        "fallbacks": dict(fallbacks),
        "tests_applied": len({r[0] for r in rows if r[2] == "applied"}),
        "tests_skipping": len({r[0] for r in rows if r[2] == "applied" and float(r[3]) > 0}),
    }
    rep = {"pytest_rc": rc, "summary": sums[-1] if sums else _one_line(tail.splitlines()[-1] if tail else ""),
           "seconds": round(time.perf_counter() - start, 1), "built": built, "tests": read_junit(xml),
           "mmskip_sources": [digest, source_digest()]}  # fmt: skip
    print(f"[{tag}] rc={rc} in {rep['seconds']:.0f} s: {rep['summary']}; models {built}", flush=True)
    return rep


def counts(tests: dict[str, dict]) -> dict[str, int]:
    c = Counter(t["outcome"] for t in tests.values())
    return {"passed": c["passed"], "failed": c["failed"] + c["error"], "skipped": c["skipped"], "total": len(tests)}


def cause(message: str) -> str:
    """The message with numbers, addresses and quoted values blanked: tests failing for one reason group."""
    m = re.sub(r"0x[0-9a-f]+", "0x_", message)
    m = re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "N", m)
    return re.sub(r"'[^']*'", "'_'", m)[:140]


def classify(parent: dict[str, dict], variant: str, tests: dict[str, dict]) -> dict:
    """Tests passing on the parent and not on ``variant``: inherent (an ``INHERENT`` pattern) or breakage."""
    inherent, breakage, fixed = [], [], []
    for name, res in sorted(tests.items()):
        base = parent.get(name)
        if base is None:
            continue
        if base["outcome"] == "passed" and res["outcome"] != "passed":
            entry = {"test": name, "outcome": res["outcome"], "message": res["message"]}
            reason = next((r for p, r in INHERENT.items() if re.search(p, f"{variant}::{name}")), None)
            (inherent if reason else breakage).append({**entry, "reason": reason} if reason else entry)
        elif base["outcome"] in ("failed", "error") and res["outcome"] == "passed":
            fixed.append(name)
    return {"inherent": inherent, "breakage": breakage, "fixed_vs_parent": fixed}


def _grouped(entries: list[dict], key) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for e in entries:
        groups[key(e)].append(e)
    return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [
        "# transformers' Llama and Qwen2 model + generation tests with mmskip techniques applied",
        "",
        f"Installed transformers {meta['transformers']}, torch {meta['torch']}; CPU ({meta['cpu_count']} cores), "
        f"per-test timeout {meta['timeout']} s, {meta['workers']} worker(s){', -k ' + repr(meta['k']) if meta['k'] else ''}; "
        f"{meta['seconds']:.0f} s in all; mmskip commit {meta['mmskip_commit']} plus the working tree.",
        "",
        f"Tests from `{meta['source']}`: the transformers 5.24.0 sdist's `tests/*.py` (`test_modeling_common.py` "
        f"etc.) plus the files the sdist lacks (`causal_lm_tester.py`, `generation/test_utils.py`, "
        f"`models/{{llama,qwen2}}`, ...) from upstream commit `{TESTS_COMMIT}` (2026-08-19, newest reachable), and "
        "two shims (root `conftest.py`: `_TEXT_MODEL_TESTER_DEFAULTS`; `tests/distributed_testing_utils.py`); "
        "blob hashes in the JSON.",
        "",
        "Variants (a fresh config per model, `last` = the top layer; classes mmskip does not support stay as they are):",
        "",
        *[f"- **{v}**: `{VARIANTS[v]}`; pre-flight (2-layer Llama, 4 new tokens): {meta['preflight'].get(v, '-')}"
          for v in meta["variants"]],  # fmt: skip
        "",
        "| suite | variant | passed | failed | skipped | pass on parent, not here: inherent | breakage "
        "| models applied / unsupported / refused (tests applying; tests where it skipped) | time |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for key, suite in data["suites"].items():
        for v, run in suite["runs"].items():
            c, cmp, b = run["counts"], run.get("compare"), run["built"]
            inh, brk = (str(len(cmp["inherent"])), f"**{len(cmp['breakage'])}**") if cmp else ("", "")
            refused = sum(n for st, n in b["models"].items() if st.startswith("refused"))
            models = (f"{b['models'].get('applied', 0)} / {b['models'].get('unsupported', 0)} / {refused} "
                      f"({b['tests_applied']}; {b['tests_skipping']})") if v != "parent" else ""  # fmt: skip
            changed = " (**mmskip changed during the run**)" if len(set(run["mmskip_sources"])) > 1 else ""
            lines.append(f"| {key} | {v} | {c['passed']} | {c['failed']} | {c['skipped']} | {inh} | {brk} "
                         f"| {models} | {run['seconds']:.0f} s{changed} |")  # fmt: skip
    lines += ["", "Counts are per test from the junit XML (a failing subtest fails its test; pytest's own summary "
              "also counts subtests). *Refused*: a class without an LM head whose `mmskip.apply` raised (it stays "
              "unmodified); *unsupported*: `UnsupportedModelError`. Other notes per run:", ""]  # fmt: skip
    for key, suite in data["suites"].items():
        for v, run in suite["runs"].items():
            notes = [f"{st}: {n} models" for st, n in run["built"]["models"].items() if st.startswith("refused")]
            if run["built"].get("fallbacks"):
                notes.append(f"SWIFT fell back to plain generate (calls per reason): {run['built']['fallbacks']}")
            if notes:
                lines.append(f"- {key} / {v}: " + "; ".join(notes))
    for title, field, key in (("Breakage", "breakage", lambda e: cause(e["message"])),
                              ("Inherent differences", "inherent", lambda e: e["reason"])):  # fmt: skip
        lines += ["", f"## {title} (pass on the parent, not on the variant; grouped by cause)", ""]
        for suite_key, suite in data["suites"].items():
            for v, run in suite["runs"].items():
                entries = (run.get("compare") or {}).get(field, [])
                if not entries:
                    continue
                lines.append(f"### {suite_key} / {v}: {len(entries)}")
                for group in _grouped(entries, key).values():
                    first = group[0]
                    label = first["reason"] if field == "inherent" else first["message"] or "(no message)"
                    lines.append(f"- {first['outcome']} x{len(group)}: `{label}`")
                    lines.append("  - " + ", ".join(f"`{e['test']}`" for e in group))
                lines.append("")
    fixed = [f"{k}/{v}: " + ", ".join(f"`{t}`" for t in run["compare"]["fixed_vs_parent"])
             for k, s in data["suites"].items() for v, run in s["runs"].items()
             if run.get("compare") and run["compare"]["fixed_vs_parent"]]  # fmt: skip
    if fixed:
        lines += ["", "## Fail on the parent, pass on the variant", "", *[f"- {f}" for f in fixed]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tests", type=Path, help="transformers' tests folder or the folder holding it")
    ap.add_argument("--only", default="", help="comma-separated suites: " + ",".join(SUITES))
    ap.add_argument("--variants", default="", help="comma-separated variants: " + ",".join(VARIANTS))
    ap.add_argument("-k", default="", help="pytest -k expression, passed through")
    ap.add_argument("--timeout", type=int, default=120, help="per-test timeout, seconds (pytest-timeout)")
    ap.add_argument("--run-timeout", type=int, default=1800, help="wall-clock limit per pytest run, seconds")
    ap.add_argument("--workers", type=int, default=1, help="pytest-xdist workers per run (-n)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmskip_transformers_suite"), help="temporary tree")
    ap.add_argument("--out", type=Path, default=harness.RESULTS, help="folder for transformers_suite.{json,md}")
    args = ap.parse_args(argv)
    suites = [s for s in args.only.split(",") if s] or list(SUITES)
    variants = [v for v in args.variants.split(",") if v] or list(VARIANTS)
    bad = sorted(set(suites) - set(SUITES)) + sorted(set(variants) - set(VARIANTS))
    if bad:
        raise SystemExit(f"unknown suite or variant: {bad}")

    import torch
    import transformers

    start = time.perf_counter()
    args.work = args.work.resolve()
    tree = args.work / "tree"
    meta = prepare_tree(args.tests, tree)
    tests = tree / "tests"
    for key in suites:
        write_variants(tests, SUITES[key][0], SUITES[key][1], variants)
    meta.update(
        transformers=transformers.__version__, torch=torch.__version__, cpu_count=os.cpu_count(),
        tests_commit=TESTS_COMMIT, variants=variants, configs={v: VARIANTS[v] for v in variants},
        inherent=INHERENT, timeout=args.timeout, workers=args.workers, k=args.k,
        preflight=preflight(tests, variants),
        mmskip_commit=subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True).stdout.strip(),
    )  # fmt: skip
    print(f"transformers {meta['transformers']} tests from {meta['source']} -> {tree}", flush=True)
    data: dict = {"meta": meta, "suites": {}}
    for key in suites:
        test_file, parent = SUITES[key]
        stem = Path(test_file).stem.removeprefix("test_modeling_")
        variants_file = Path(test_file).with_name(f"test_mmskip_variants_{stem}.py").as_posix()
        runs = {"parent": run_pytest(tree, f"tests/{test_file}::{parent}", f"{key}_parent", args)}
        for v in variants:
            runs[v] = run_pytest(tree, f"tests/{variants_file}::{parent}_{v}", f"{key}_{v}", args)
        for v, run in runs.items():
            run["counts"] = counts(run["tests"])
            if v != "parent":
                run["compare"] = classify(runs["parent"]["tests"], v, run["tests"])
        data["suites"][key] = {"test_file": test_file, "parent_class": parent, "runs": runs}
    meta["seconds"] = round(time.perf_counter() - start, 1)
    md = markdown(data)
    print("\n" + md)
    harness.write(args.out / "transformers_suite.json", data, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
