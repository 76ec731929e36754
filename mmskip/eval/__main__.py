"""``mmskip eval images|lm ...``: quality and speed of a model with and without an mmskip config.

Examples::

    mmskip eval images --pipeline digits-dit --steps 50 --n 500 --config cfg.json
    mmskip eval lm --model stdlib-lm --config cfg.json --out lm.json

``--pipeline``/``--model`` take a zoo name or a local ``from_pretrained`` folder. ``--config`` is a
JSON file (a value ending in .json or naming a file or a folder written by
``config.save_pretrained``) or inline JSON starting with ``{`` (``config.to_json()`` output).

Speed: the baseline and the accelerated model run in ``--repeats`` interleaved pairs after one
warm-up pair (mmskip.timing.paired); the speedup is the median ratio, printed with its quartiles
and the FLOPs bound beside it. Quality and the FLOPs fraction come from separate, untimed calls.
``python -m mmskip.eval`` is an alias.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mmskip.cli import (
    ArgumentParser,
    UsageError,
    at_least,
    existing_file,
    non_negative_float,
    non_negative_int,
    positive_int,
    run,
    writable_file,
)

__all__ = ["main", "load_config", "format_table", "build_parser", "LEGEND"]

CONFIG_NAME = "mmskip_config.json"  # what SkipConfig.save_pretrained writes (mmskip.inject.CONFIG_NAME)

LEGEND = ("token_agreement: plain forwards on prompt + baseline tokens (teacher-forced; decode-only techniques skip "
          "nothing there). decode_agreement: the same tokens scored as generated, with the technique deployed.")


def _register_all() -> None:
    """Import every technique module, so that a config names one of them or the error lists them all."""
    import mmskip
    from mmskip.wings import load_wings

    mmskip.SkipConfig  # noqa: B018  (the package's first API access registers the language techniques)
    load_wings()  # the vision and diffusion techniques register when their wing is imported


def load_config(spec: str | None) -> Any:
    """Rebuild an mmskip config from a JSON file, a folder written by ``config.save_pretrained``, or
    inline JSON starting with ``{`` (``None`` -> ``None``).

    Raises ``FileNotFoundError`` for a file that is not there (a value ending in ``.json`` is
    always a path), ``ValueError`` for text that is no config (the unknown-technique message lists
    every registered technique: language, vision and diffusion).
    """
    if not spec:
        return None
    from mmskip.inject import _CONFIGS, SkipConfig

    inline = spec.lstrip().startswith("{")
    source = "inline JSON"
    if not inline:
        path = Path(spec).expanduser()
        if path.is_dir() and (path / CONFIG_NAME).is_file():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{spec}: no such file; pass a config JSON file (config.save_pretrained(folder) "
                                    "writes one) or inline JSON starting with '{' (config.to_json())")
        spec, source = path.read_text(encoding="utf-8"), str(path)
    try:
        data = json.loads(spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                         "write it as config.to_json() does") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source} holds a JSON {type(data).__name__}, not an object like "
                         '{"technique": "layer_skip", ...} (config.to_json() output)')
    if data.get("technique") not in _CONFIGS:
        _register_all()
    return SkipConfig.from_dict(data)


def format_table(result: dict[str, Any]) -> str:
    """The baseline and accelerated rows of a result as an aligned text table."""
    rows = [(name, result[name]) for name in ("baseline", "accelerated") if name in result]
    keys = sorted({k for _, r in rows for k in r}, key=lambda k: (k != "seconds", k))
    lines = ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed_lines(result: dict[str, Any]) -> list[str]:
    """How the speed was measured, the median speedup with its quartiles beside the FLOPs bound,
    and the bound warning when it fires."""
    t = result.get("timing", {})
    per_call = (f"{t['timed_prompts']} prompts x {result['max_new_tokens']} new tokens" if "timed_prompts" in t
                else f"{t.get('timed_images')} images x {result.get('steps')} steps")
    if "accelerated" not in result:
        return [f"seconds: median of {t['repeats']} calls ({per_call} each) after {t['warmup']} warm-up"]
    lo, hi = t["spread"]
    bound = t.get("flops_bound")
    lines = [f"speedup {t['speedup']:.2f}x (quartiles {lo:.2f}-{hi:.2f}, {t['pairs']} interleaved pairs of "
             f"{per_call} after {t['warmup']} warm-up); FLOPs bound "
             + (f"{bound:.2f}x" if bound else "not reported by this technique")]
    if t.get("bound_warning"):
        lines.append(f"warning: {t['bound_warning']}")
    return lines


def build_parser() -> ArgumentParser:
    """The ``mmskip eval`` parser: every count must be >= 1 and ``--out`` writable (checked before any work)."""
    from .lm import MAX_WINDOWS, SEQ_LEN

    p = ArgumentParser(prog="mmskip eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{images,lm}")
    pi = sub.add_parser("images", help="FID / CLIP score / accuracy / PSNR-SSIM vs baseline of an image pipeline")
    pi.add_argument("--pipeline", default="digits-dit", help="zoo name or local diffusers folder")
    pi.add_argument("--steps", type=positive_int, default=50, help="sampler steps (default 50)")
    pi.add_argument("--n", type=positive_int, default=500, help="images for the quality metrics (default 500)")
    pi.add_argument("--time-images", type=positive_int, default=20,
                    help="images per timed call (default 20, at most --n)")
    pi.add_argument("--guidance-scale", type=non_negative_float, default=4.0)
    pi.add_argument("--seed", type=non_negative_int, default=0)
    pi.add_argument("--config", default=None, help="mmskip config: a JSON file, or inline JSON")
    pi.add_argument("--component", default="auto", help="pipeline component to attach the config to")
    pi.add_argument("--clip", default="digits-clip", help="'digits-clip', 'ARCH:CHECKPOINT' or 'none'")
    pl = sub.add_parser("lm", help="perplexity / token agreement / exact match vs baseline of a causal LM")
    pl.add_argument("--model", default="stdlib-lm", help="zoo name or local transformers folder")
    pl.add_argument("--config", default=None, help="mmskip config: a JSON file, or inline JSON")
    pl.add_argument("--n-prompts", type=positive_int, default=32, help="prompts for the agreement metrics")
    pl.add_argument("--time-prompts", type=positive_int, default=8,
                    help="prompts per timed call (default 8, at most --n-prompts)")
    pl.add_argument("--prompt-len", type=positive_int, default=64)
    pl.add_argument("--max-new-tokens", type=positive_int, default=32)
    pl.add_argument("--text-file", type=existing_file, default=None,
                    help="held-out text (default: held-out stdlib modules)")
    pl.add_argument("--seq-len", type=at_least(2), default=SEQ_LEN, help="perplexity window length in tokens")
    pl.add_argument("--max-windows", type=positive_int, default=MAX_WINDOWS,
                    help=f"perplexity on the first N windows (default {MAX_WINDOWS} x {SEQ_LEN}: the stdlib-lm "
                         "card's set)")
    for sp in (pi, pl):
        sp.add_argument("--repeats", type=at_least(3), default=5,
                        help="timed pairs (baseline, accelerated), interleaved, after one warm-up pair (default 5)")
        sp.add_argument("--out", type=writable_file, default=None, help="JSON output path (checked before any work)")
        sp.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
        sp.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    return p


def _inputs(a: Any, prog: str) -> tuple[Any, Any]:
    """The config and the model (or pipeline) the arguments name; a wrong one is a :class:`UsageError`."""
    try:
        config = load_config(a.config)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise UsageError(f"--config {e}", prog) from None
    flag, spec = ("--pipeline", a.pipeline) if a.cmd == "images" else ("--model", a.model)
    if a.cmd == "images":
        from .images import component_name, load_pipeline

        try:
            target = load_pipeline(a.pipeline)
            component = component_name(target, a.component)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"{flag} {spec}: {e}", prog) from None
        module = getattr(target, component)
    else:
        from .lm import load_lm

        try:
            target = load_lm(a.model)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"{flag} {spec}: {e}", prog) from None
        module = target[0]
    if config is not None:
        from mmskip.inject import apply

        try:  # does it fit this model? (cheap, before any work)
            apply(module, config).remove()
        except (TypeError, ValueError) as e:  # UnsupportedModelError is a TypeError
            raise UsageError(f"--config {config.technique} does not fit {flag} {spec}: {e}", prog) from None
    return config, target


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = build_parser().parse_args(argv)
    prog = f"mmskip eval {a.cmd}"
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    config, target = _inputs(a, prog)
    if a.cmd == "images":
        from .images import evaluate_pipeline

        res = evaluate_pipeline(target, n=a.n, steps=a.steps, guidance_scale=a.guidance_scale, seed=a.seed,
                                config=config, component=a.component, clip=None if a.clip == "none" else a.clip,
                                repeats=a.repeats, time_images=min(a.time_images, a.n))
        res["pipeline"] = a.pipeline
    else:
        from .lm import evaluate_lm

        model, tok = target
        res = evaluate_lm(model, tok, config, n_prompts=a.n_prompts, prompt_len=a.prompt_len,
                          max_new_tokens=a.max_new_tokens, seq_len=a.seq_len, max_windows=a.max_windows,
                          text_file=a.text_file and str(a.text_file), repeats=a.repeats, time_prompts=a.time_prompts)
        res["model"] = a.model
    warning = res.get("timing", {}).get("bound_warning")
    if a.json:
        print(json.dumps(res, indent=2, default=str))
        if warning:
            print(f"{prog}: warning: {warning}", file=sys.stderr)
    else:
        print(format_table(res))
        print("\n".join(speed_lines(res)))
        if "perplexity_set" in res:
            print(f"perplexity on the {res['perplexity_set']}")
        if "decode_agreement" in res.get("accelerated", {}):
            print(LEGEND)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2, default=str) + "\n")
        if not a.json:
            print(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    sys.exit(run("eval", main))
