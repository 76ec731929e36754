"""``python -m mmskip.eval images|lm ...``: quality (and time) of a model with and without an mmskip config.

Examples::

    python -m mmskip.eval images --pipeline digits-dit --steps 50 --n 500 --config cfg.json
    python -m mmskip.eval lm --model stdlib-lm --config cfg.json --out lm.json

``--pipeline``/``--model`` take a zoo name or a local ``from_pretrained`` folder. ``--config`` is a
JSON file (or inline JSON) of an mmskip technique config (``SkipConfig.to_dict()`` output).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["main", "load_config", "format_table"]


def load_config(spec: str | None) -> Any:
    """Rebuild an mmskip config from a JSON file path or inline JSON (``None`` -> ``None``)."""
    if not spec:
        return None
    from mmskip.inject import SkipConfig

    text = Path(spec).read_text() if os.path.exists(spec) else spec
    return SkipConfig.from_dict(json.loads(text))  # imports the technique's module (e.g. mmskip.diffusion)


def format_table(result: dict[str, Any]) -> str:
    """The baseline and accelerated rows of a result as an aligned text table."""
    rows = [(name, result[name]) for name in ("baseline", "accelerated") if name in result]
    keys = sorted({k for _, r in rows for k in r}, key=lambda k: (k != "seconds", k))
    lines = ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from .lm import MAX_WINDOWS, SEQ_LEN

    p = argparse.ArgumentParser(prog="python -m mmskip.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("images", help="FID / CLIP score / accuracy / PSNR-SSIM vs baseline of an image pipeline")
    pi.add_argument("--pipeline", default="digits-dit", help="zoo name or local diffusers folder")
    pi.add_argument("--steps", type=int, default=50)
    pi.add_argument("--n", type=int, default=500)
    pi.add_argument("--guidance-scale", type=float, default=4.0)
    pi.add_argument("--seed", type=int, default=0)
    pi.add_argument("--config", default=None, help="mmskip config JSON (file or inline)")
    pi.add_argument("--component", default="auto", help="pipeline component to attach the config to")
    pi.add_argument("--clip", default="digits-clip", help="'digits-clip', 'ARCH:CHECKPOINT' or 'none'")
    pi.add_argument("--out", type=Path, default=None, help="JSON output path")
    pl = sub.add_parser("lm", help="perplexity / token agreement / exact match vs baseline of a causal LM")
    pl.add_argument("--model", default="stdlib-lm", help="zoo name or local transformers folder")
    pl.add_argument("--config", default=None)
    pl.add_argument("--n-prompts", type=int, default=32)
    pl.add_argument("--prompt-len", type=int, default=64)
    pl.add_argument("--max-new-tokens", type=int, default=32)
    pl.add_argument("--text-file", default=None, help="held-out text (default: held-out stdlib modules)")
    pl.add_argument("--seq-len", type=int, default=SEQ_LEN, help="perplexity window length in tokens")
    pl.add_argument("--max-windows", type=int, default=MAX_WINDOWS,
                    help=f"perplexity on the first N windows (default {MAX_WINDOWS} x {SEQ_LEN}: the stdlib-lm "
                         "card's set)")
    pl.add_argument("--out", type=Path, default=None)
    for sp in (pi, pl):
        sp.add_argument("--threads", type=int, default=None)
        sp.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    a = p.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    config = load_config(a.config)
    if a.cmd == "images":
        from .images import evaluate_pipeline, load_pipeline

        res = evaluate_pipeline(load_pipeline(a.pipeline), n=a.n, steps=a.steps, guidance_scale=a.guidance_scale,
                                seed=a.seed, config=config, component=a.component,
                                clip=None if a.clip == "none" else a.clip)
        res["pipeline"] = a.pipeline
    else:
        from .lm import evaluate_lm, load_lm

        model, tok = load_lm(a.model)
        res = evaluate_lm(model, tok, config, n_prompts=a.n_prompts, prompt_len=a.prompt_len,
                          max_new_tokens=a.max_new_tokens, seq_len=a.seq_len, max_windows=a.max_windows,
                          text_file=a.text_file)
        res["model"] = a.model
    if a.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print(format_table(res))
        if "perplexity_set" in res:
            print(f"perplexity on the {res['perplexity_set']}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2, default=str) + "\n")
        if not a.json:
            print(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
