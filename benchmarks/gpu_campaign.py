"""The GPU campaign (issue 33): every modality at real shapes in one time-boxed run on one H100 / H200.

    python benchmarks/gpu_campaign.py --out $OUT/gpu_campaign.json --budget 480   # on a GPU, first thing
    python benchmarks/gpu_campaign.py --smoke --out /tmp/c.json                    # CPU, tiny shapes, seconds

Random weights throughout: the figures are speed only (no quality at real shapes; that needs trained
weights). Sections, in this order, each with a share of ``--budget`` seconds (what one leaves over
goes to the next):

* ``llm`` (``_campaign_llm.py``): a Llama-3-8B-shaped decoder (``--llm-layers`` of 32 layers), bf16,
  batch ``--llm-batches``: unified s=1.5 / 2, void layers, FFN-SkipLLM, eager and compiled (static
  cache); SWIFT and early exit at batch 1.
* ``vision`` (``_campaign_vision.py``): p-MoD and VideoLLM-MoD prefill on a LLaVA-OneVision-shaped model
  (Qwen2-7B width, ``--vision-layers`` decoder layers); MuE generation on a Florence-2-large-shaped model.
* ``diffusion`` (``_campaign_diffusion.py``): ``diffusion_gpu.py`` (SD 1.5 UNet, Flux- and Wan-width
  transformers vs FirstBlockCache / MagCache / TaylorSeer / cache-dit, eager and regional compile)
  with a reduced method list, plus a host-sync check of mmskip's inheritance and the attention-backend rows
  (``_campaign_attention.py``: xformers and diffusers' backends on the zoo's Skip pipelines).

Each row: section, model and shape, technique, batch, eager / compiled, speedup (median) with its
quartiles and IQR, FLOPs bound, host syncs (``torch.cuda.set_sync_debug_mode("error")`` around one
untimed call; "not checked (CPU)" on CPU), device and torch / transformers / diffusers versions, and
``error`` or ``skipped`` when it has no figure, and ``quality``: the zoo model's quality for the same technique,
read at report time from the committed results (``_campaign_quality.py``; the file is named), or why there is none. On CUDA every section runs in its own process with a
hard time limit; rows are appended to ``<out>.<section>.part.jsonl`` as they finish and merged into
``<out>`` after each section, so a crash or timeout loses at most the row in flight. Files: ``<out>``
(JSON), ``.md`` (one table per section), ``.png``, ``<stem>_diffusion.json`` / ``.md`` (diffusion_gpu's
own) and at most one part file while a section runs: at most 6.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import torch
from _campaign_quality import annotate
from _campaign_report import markdown, plot
from _campaign_rows import Context, versions

SHARES = {"llm": 0.4, "vision": 0.15, "diffusion": 0.45}  # of the budget left; unused time rolls over


def _llm(ctx: Context) -> None:
    import _campaign_llm

    _campaign_llm.run(ctx)


def _vision(ctx: Context) -> None:
    import _campaign_vision

    _campaign_vision.run(ctx)


def _diffusion(ctx: Context) -> None:
    import _campaign_diffusion

    _campaign_diffusion.run(ctx)


def _collect_diffusion(ctx: Context) -> list[dict[str, Any]]:
    import _campaign_diffusion

    return _campaign_diffusion.collect(ctx)


SECTIONS: dict[str, Callable[[Context], None]] = {"llm": _llm, "vision": _vision, "diffusion": _diffusion}
# rows a section leaves in files of its own, read after it ends (also after a timeout)
COLLECT: dict[str, Callable[[Context], list[dict[str, Any]]]] = {"diffusion": _collect_diffusion}


def parser() -> argparse.ArgumentParser:
    p = harness.arguments(__doc__, repeats=5, threads=None, full_doc=True,
                          smoke="CPU, float32, tiny shapes, every section and code path in well under a minute")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all sections together")
    p.add_argument("--sections", default="llm,vision,diffusion", help="comma-separated, run in this order")
    p.add_argument("--isolate", choices=("auto", "process", "inline"), default="auto",
                   help="a process per section with a hard time limit (auto: on CUDA) or all in this process")
    p.add_argument("--llm-layers", type=int, default=None, help="decoder layers of the 8B-shaped model (default 8)")
    p.add_argument("--llm-batches", type=int, nargs="+", default=None, help="default 1 8 32")
    p.add_argument("--llm-new-tokens", type=int, default=None, help="default 64")
    p.add_argument("--llm-prompt", type=int, default=None, help="prompt tokens, default 32")
    p.add_argument("--llm-backend", default=None, help="torch.compile backend (default inductor; smoke: eager)")
    p.add_argument("--llm-compile-mode", default="reduce-overhead",
                   help="torch.compile mode of compiled decoding on CUDA (CPU: default); 'default' = no CUDA graphs")
    p.add_argument("--vision-layers", type=int, default=None, help="decoder layers of the OneVision-shaped model")
    p.add_argument("--vision-frames", type=int, nargs="+", default=None, help="video frames, default 8 32")
    p.add_argument("--diffusion-models", default=None, help="diffusion_gpu.py --models (default flux,sd15,wan)")
    p.add_argument("--diffusion-only", default=None, help="diffusion_gpu.py --only (default: a reduced list)")
    p.add_argument("--attention-models", default="digits-dit,scenes-flux",
                   help="zoo pipelines whose Skip pipelines are checked under each attention backend ('' = none)")
    p.add_argument("--diffusion-repeats", type=int, default=3, help="diffusion_gpu.py --repeats (paired rounds)")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # a child process: run this section only
    p.add_argument("--part", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p


def defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the section options left unset: real shapes, or tiny ones with ``--smoke``."""
    smoke = args.smoke
    for name, real, tiny in (("llm_layers", 8, 4), ("llm_batches", [1, 8, 32], [1, 2]), ("llm_new_tokens", 64, 6),
                             ("llm_prompt", 32, 8), ("llm_backend", "inductor", "eager"), ("vision_layers", 4, 4),
                             ("vision_frames", [8, 32], [2]), ("diffusion_models", "flux,sd15,wan", "flux")):
        if getattr(args, name) is None:
            setattr(args, name, tiny if smoke else real)
    if smoke:
        args.repeats = min(args.repeats, 3)
    return args


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    if args.smoke or not torch.cuda.is_available():
        return torch.device("cpu"), torch.float32
    return torch.device("cuda"), torch.bfloat16


def paths(args: argparse.Namespace) -> Path:
    return Path(args.out or harness.RESULTS / ("gpu_campaign_smoke.json" if args.smoke else "gpu_campaign.json"))


def make_context(name: str, args: argparse.Namespace, deadline: float, emit: Callable[[dict], None]) -> Context:
    device, dtype = device_and_dtype(args)
    return Context(name, device, dtype, deadline, args, emit, meta=versions(device), out=paths(args))


def run_inline(name: str, args: argparse.Namespace, deadline: float, emit: Callable[[dict], None]) -> Context:
    """One section in this process; an exception it lets out becomes an error row for the section."""
    ctx = make_context(name, args, deadline, emit)
    try:
        SECTIONS[name](ctx)
    except Exception as err:
        import traceback

        traceback.print_exc(limit=6)
        ctx.row("(section)", "(section)", None, "-", error=f"section failed: {type(err).__name__}: {str(err)[:400]}")
    return ctx


def section_command(name: str, argv: list[str], part: Path, deadline: float) -> list[str]:
    """The command that runs one section in a child process of its own."""
    return [sys.executable, str(Path(__file__).resolve()), *argv, "--section", name, "--part", str(part),
            "--deadline", str(deadline)]


_RUNNING: list[int] = []  # the section process now running (its process group), for the signal handler


def _die_with_parent() -> Callable[[], Any] | None:
    """What the child runs before exec: die when the campaign dies (Linux ``PR_SET_PDEATHSIG``), so a campaign
    killed from outside (a time limit on the whole command) never leaves a section holding the GPU. Resolved
    here, in the parent: between fork and exec the child must not import anything. ``None`` off Linux (the
    signal handler in main() still covers SIGTERM / SIGINT / SIGHUP)."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _on_signal(signum: int, frame: Any) -> None:
    for pid in _RUNNING:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def run_process(cmd: list[str], limit: float) -> dict[str, Any] | None:
    """Run ``cmd`` (its output goes to ours), killed with its process group after ``limit`` seconds;
    ``None`` when it exited with status 0, else the error for the section's row."""
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent())
    _RUNNING.append(proc.pid)
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"error": f"section killed at its time limit ({limit:.0f} s); rows finished before are kept"}
    finally:
        _RUNNING.remove(proc.pid)
    return None if rc == 0 else {"error": f"section process exited with status {rc} (see the log above)"}


def _read_part(part: Path) -> list[dict[str, Any]]:
    if not part.exists():
        return []
    rows = [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
    part.unlink()
    return rows


def child(args: argparse.Namespace) -> int:
    """A section's own process: rows go to the part file, one JSON line each, as they finish."""
    with open(args.part, "a") as f:
        def emit(row: dict[str, Any]) -> None:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()

        run_inline(args.section, args, args.deadline, emit)
    return 0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # the sections import their siblings when they run (`mmskip bench` drops the path)
        sys.path.insert(0, here)
    args = defaults(parser().parse_args(argv))
    if args.section:
        child(args)
        return {}
    device, dtype = device_and_dtype(args)
    if device.type == "cpu" and not args.smoke:
        print("gpu_campaign: no CUDA device, nothing measured (--smoke checks every code path on CPU)")
        return {}
    out = paths(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    isolate = args.isolate == "process" or (args.isolate == "auto" and device.type == "cuda")
    if isolate:  # a campaign stopped from outside stops its section too
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, _on_signal)
    names = [s for s in args.sections.split(",") if s]
    meta = {**versions(device), "dtype": str(dtype).removeprefix("torch."), "smoke": args.smoke, "budget_s": args.budget,
            "sections": names, "isolated": isolate, "repeats": args.repeats, "llm_layers": args.llm_layers,
            "llm_batches": args.llm_batches, "vision_layers": args.vision_layers, "vision_frames": args.vision_frames,
            "diffusion_models": args.diffusion_models, "weights": "random (speed only; no quality at real shapes)",
            "date": time.strftime("%Y-%m-%d %H:%M")}
    result: dict[str, Any] = {"meta": meta, "rows": [], "section_s": {}}
    print("gpu_campaign: " + ", ".join(f"{k} {v}" for k, v in meta.items()), flush=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    start = time.time()
    for i, name in enumerate(names):
        t0 = time.time()
        left = args.budget - (t0 - start)
        shares = [SHARES.get(n, 0.2) for n in names[i:]]
        limit = max(left * shares[0] / sum(shares), 0.0)
        soft = t0 + max(limit - max(20.0, 0.15 * limit), 0.2 * limit)  # no row starts after this
        if name not in SECTIONS:
            result["rows"].append({"section": name, "error": f"unknown section (known: {', '.join(SECTIONS)})"})
            continue
        print(f"\n== {name}: {limit:.0f} s of {left:.0f} s left", flush=True)
        part = out.with_name(f"{out.stem}.{name}.part.jsonl")
        if isolate:
            failed = run_process(section_command(name, argv, part, soft), limit)
            ctx = make_context(name, args, soft, result["rows"].append)
            result["rows"] += _read_part(part)
            if failed:
                ctx.row("(section)", "(section)", None, "-", **failed)
        else:
            def emit(row: dict[str, Any]) -> None:
                result["rows"].append(row)
                save()

            ctx = run_inline(name, args, soft, emit)
        if name in COLLECT:
            try:
                result["rows"] += COLLECT[name](ctx)
            except Exception as err:
                ctx.row("(section)", "(collect)", None, "-", error=f"{type(err).__name__}: {err}")
        result["section_s"][name] = time.time() - t0
        save()
    result["meta"]["total_s"] = time.time() - start
    annotate(result["rows"])  # each row's zoo-model quality, read from benchmarks/results/ now
    harness.write(out, result, markdown(result), plot=lambda png: _plot(result, png))
    return result


def _plot(result: dict[str, Any], png: Path) -> None:
    """The figure; a failure to draw it is printed, not raised (the JSON and tables are already written)."""
    try:
        plot(result, png)
    except Exception as err:
        import traceback

        traceback.print_exc(limit=4)
        print(f"gpu_campaign: no figure ({type(err).__name__}: {err})", flush=True)


if __name__ == "__main__":
    main()
