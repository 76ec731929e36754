"""``mmskip analyze``: depth-efficiency analysis of a language model on a text file.

    mmskip analyze --model stdlib-lm --text some.py --out analysis/
    mmskip analyze --model /path/to/llama --text notes.txt --out analysis/ --chunks 8 --chunk-tokens 128

``--model`` is a zoo name or a ``from_pretrained`` folder (model and tokenizer). The text is
tokenized and cut into ``--chunks`` windows of ``--chunk-tokens`` tokens, analysed as one batch.
Writes ``depth.json`` and PNG plots into ``--out`` and prints a summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from ..eval.lm import load_lm
from .depth import DepthReport, depth_report


def chunk_text(tokenizer: Any, text: str, chunks: int, chunk_tokens: int) -> torch.Tensor:
    """Up to ``chunks`` consecutive windows of exactly ``chunk_tokens`` tokens, as a (n, chunk_tokens) batch."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = min(chunks, len(ids) // chunk_tokens)
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one chunk of {chunk_tokens}; "
                         "use a longer text or a smaller --chunk-tokens")
    return ids[: n * chunk_tokens].view(n, chunk_tokens)


def summary(report: DepthReport) -> str:
    import statistics

    c, e = report.contributions, report.skip_effect
    half = report.num_layers // 2
    first = statistics.median(c["layer"][:half])
    second = statistics.median(c["layer"][half:])
    lines = [
        f"{report.model}: {report.num_layers} layers, {report.tokens} tokens",
        f"median relative layer contribution: first half {first:.3f}, second half {second:.3f}",
        "relative contribution (||out||/||residual||) | skip -> output KL, top-1 agreement (layer, attn, MLP) | voids",
        "layer   attn    mlp  layer |  KL     agree  attn-agree mlp-agree | PP   RG",
    ]
    for i in range(report.num_layers):
        lines.append(
            f"{i:5d} {c['attn'][i]:6.3f} {c['mlp'][i]:6.3f} {c['layer'][i]:6.3f} | {e['output_kl'][i]:6.4f} "
            f"{e['output_agreement'][i]:6.3f} {e['attn_output_agreement'][i]:9.3f} {e['mlp_output_agreement'][i]:9.3f} |"
            f" {report.voids['prompt'][i]:.2f} {report.voids['response'][i]:.2f}"
        )
    lines.append("joint skip curve (least-effect layers first): n_skipped -> top-1 agreement, KL")
    for p in report.curve:
        lines.append(f"  {len(p['skipped']):3d}  {p['output_agreement']:.3f}  {p['output_kl']:.4f}  {p['skipped']}")
    lines.append(f"suggested skip (agreement >= {report.min_agreement}): {report.suggested_skip}")
    return "\n".join(lines)


def _error(message: str) -> int:
    """One line on stderr (what is wrong and what to do) and exit status 2, like argparse's errors."""
    print(f"mmskip analyze: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mmskip analyze", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="zoo name (e.g. stdlib-lm) or from_pretrained folder")
    ap.add_argument("--text", required=True, help="a text file to analyse the model on")
    ap.add_argument("--out", default="mmskip-analysis", help="folder for depth.json and the PNG plots")
    ap.add_argument("--chunks", type=int, default=8, help="number of text windows (batch size)")
    ap.add_argument("--chunk-tokens", type=int, default=128, help="tokens per window")
    ap.add_argument("--min-agreement", type=float, default=0.9, help="top-1 agreement the suggested skip set keeps")
    ap.add_argument("--max-skip", type=float, default=0.5, help="most layers (fraction) the suggestion skips")
    ap.add_argument("--void-alpha", type=float, default=0.8, help="LAC threshold factor for void layers")
    ap.add_argument("--no-plots", action="store_true", help="write JSON only")
    ap.add_argument("--json", action="store_true", help="print the report as JSON instead of the summary")
    args = ap.parse_args(argv)

    text = Path(args.text)
    if not text.is_file():
        return _error(f"--text {args.text}: no such file; pass a text file to analyse the model on "
                      "(e.g. --text some_module.py)")
    try:
        model, tokenizer = load_lm(args.model)
    except (FileNotFoundError, ValueError) as e:  # unknown name, untrained zoo model, not a language model
        return _error(f"--model {args.model}: {e}")
    try:
        ids = chunk_text(tokenizer, text.read_text(errors="replace"), args.chunks, args.chunk_tokens)
    except ValueError as e:
        return _error(f"--text {args.text}: {e}")
    report = depth_report(model, ids, min_agreement=args.min_agreement, max_skip=args.max_skip,
                          void_alpha=args.void_alpha)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.to_json(out / "depth.json")
    try:
        written = [] if args.no_plots else report.plot(out)
    except ImportError as e:  # matplotlib is the optional 'analysis' extra
        return _error(f"{e} (or pass --no-plots); {out / 'depth.json'} is written")
    if args.json:
        print((out / "depth.json").read_text())
        return 0
    print(summary(report))
    print(f"wrote {out / 'depth.json'}" + "".join(f", {p.name}" for p in written))
    return 0
