"""``mmskip tune``: tune a zoo model or a local model folder from the shell.

    mmskip tune --model digits-dit --floor psnr=35 --budget 10m --out tuned/
    mmskip tune --model stdlib-lm --floor agreement=0.9 --budget 40

Writes into ``--out``: ``trials.jsonl`` (rerun the same command to continue a stopped search),
``mmskip_tune.json`` (the result), the best configs (``mmskip_config.json``,
``mmskip_skip_config.json``), ``front.png`` and ``front.md``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from ..cli import ArgumentParser, UsageError, positive_int, writable_dir

__all__ = ["main", "parse_floor", "load_model", "stock_inputs"]

logger = logging.getLogger(__name__)
PROG = "mmskip tune"


def parse_floor(text: str | None) -> tuple[str | None, float | None]:
    """``"psnr=35"`` -> ``("psnr", 35.0)``; ``"0.9"`` -> ``(None, 0.9)`` (the target's metric)."""
    if text is None:
        return None, None
    name, sep, value = text.partition("=")
    if not sep:
        name, value = "", text
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"--floor {text!r}: give METRIC=NUMBER (psnr=35, agreement=0.9) or a number", PROG) from None
    return (name.strip() or None), number


def load_model(spec: str) -> tuple[Any, dict[str, Any]]:
    """The model (or pipeline) and the target options it needs (a tokenizer)."""
    from .. import zoo

    folder = Path(spec)
    is_lm = (folder / "config.json").is_file() and not (folder / "model_index.json").is_file()
    if spec in zoo.NAMES:
        loaded = zoo.load(spec)
        if isinstance(loaded, tuple):  # language models load as (model, tokenizer)
            return loaded[0].float().eval(), {"tokenizer": loaded[1]}
        return loaded, {}
    if is_lm:
        from ..eval.lm import load_lm

        model, tok = load_lm(spec)
        return model, {"tokenizer": tok}
    from ..eval.images import load_pipeline

    return load_pipeline(spec), {}


def stock_inputs(name: str, target: Any, n: int, offset: int = 0) -> list[Any]:
    """``n`` stock inputs from ``offset`` for model ``name``: the zoo's captions for its text-to-image
    pipelines (:func:`mmskip.zoo.prompts.zoo_inputs`), else the target's own (``default_inputs``)."""
    from ..zoo.prompts import zoo_inputs

    own = zoo_inputs(Path(name).name if Path(name).is_dir() else name, n, offset)
    return own if own is not None else target.default_inputs(n, offset)


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog=PROG, description="The fastest configuration of a model that keeps a quality floor, "
                        "measured on this machine (mmskip.tune).")
    ap.add_argument("--model", required=True, help="zoo name (digits-dit, stdlib-lm, ...) or a model / pipeline folder")
    ap.add_argument("--floor", default=None, help="quality floor, METRIC=NUMBER (psnr=35, agreement=0.9) or a number "
                    "on the model's default metric (default: the target's, e.g. agreement 1.0, psnr 30)")
    ap.add_argument("--budget", default="5m", help="search budget: trials (40) or time (10m, 90s); default 5m")
    ap.add_argument("--out", type=writable_dir, default="tuned", help="folder for the trial log and the result")
    ap.add_argument("--inputs", type=positive_int, default=8, help="calibration inputs (stock prompts / labels)")
    ap.add_argument("--held-out", type=positive_int, default=8, help="held-out inputs the figures come from")
    ap.add_argument("--steps", type=positive_int, default=None, help="pipelines: the baseline's inference steps")
    ap.add_argument("--max-new-tokens", type=positive_int, default=None, help="language models: tokens per prompt")
    ap.add_argument("--finalists", type=positive_int, default=6, help="candidates confirmed on held-out inputs")
    ap.add_argument("--repeats", type=positive_int, default=5, help="paired timing rounds per finalist (>= 3)")
    ap.add_argument("--backend", choices=("local", "ray"), default="local",
                    help="where calibration trials run: this process, or Ray actors (pip install 'mmskip[ray]')")
    ap.add_argument("--workers", type=positive_int, default=None, help="trials per round (Ray: actors; default 2)")
    ap.add_argument("--ray-address", default=None, help="a running Ray cluster (auto); default: start a local one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    metric, floor = parse_floor(args.floor)
    from .backends import check_backend
    from .search import TuneError, parse_budget
    from .target import UnsupportedTargetError, make_target
    from .tune import tune

    try:
        parse_budget(args.budget)
    except TuneError as e:
        raise UsageError(f"--budget: {e}", PROG) from None
    try:
        check_backend(args.backend, args.workers, args.ray_address)
    except (TuneError, ImportError) as e:
        raise UsageError(str(e), PROG) from None
    try:
        model, options = load_model(args.model)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--model {args.model}: {e}", PROG) from None
    if args.steps is not None:
        options["steps"] = args.steps
    if args.max_new_tokens is not None:
        options["max_new_tokens"] = args.max_new_tokens
    out = Path(args.out)
    try:
        target = make_target(model, **options)
        calib = stock_inputs(args.model, target, args.inputs)
        held = stock_inputs(args.model, target, args.held_out, offset=args.inputs)
        result = tune(target, calib, held_out=held, floor=floor, metric=metric, budget=args.budget, out=out,
                      seed=args.seed, finalists=args.finalists, repeats=args.repeats, progress=not args.no_progress,
                      backend=args.backend, workers=args.workers, ray_address=args.ray_address)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the trial log is kept in {out / 'trials.jsonl'}: rerun the same command to "
              "continue", file=sys.stderr)
        return 130
    except (TuneError, UnsupportedTargetError, ImportError, TypeError, ValueError) as e:
        raise UsageError(str(e), PROG) from None
    result.save(out)
    (out / "front.md").write_text(result.table() + "\n")
    try:
        result.plot(out / "front.png")
    except ImportError as e:  # matplotlib is an extra; the table and JSON are written regardless
        logger.warning("no plot: %s", e)
    print(result.table())
    print(f"\n{result.message}\n{result.trials} trials in {result.seconds:.0f} s; wrote {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
