"""``mmskip analyze``: depth-efficiency analysis of a language model on a text file.

    mmskip analyze --model stdlib-lm --text some.py --out analysis/
    mmskip analyze --model /path/to/llama --text notes.txt --out analysis/ --chunks 8 --chunk-tokens 128

``--model`` is a zoo name or a ``from_pretrained`` folder (model and tokenizer). The text is
tokenized and cut into ``--chunks`` windows of ``--chunk-tokens`` tokens, analysed as one batch.
Writes ``depth.json`` and PNG plots into ``--out`` and prints a summary.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from ..cli import (
    ArgumentParser,
    UsageError,
    fraction,
    positive_float,
    positive_int,
    proper_fraction,
    run,
    writable_dir,
)
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


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="mmskip analyze", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="zoo name (e.g. stdlib-lm) or from_pretrained folder")
    ap.add_argument("--text", required=True, help="a text file to analyse the model on")
    ap.add_argument("--out", type=writable_dir, default="mmskip-analysis",
                    help="folder for depth.json and the PNG plots (checked before any work)")
    ap.add_argument("--chunks", type=positive_int, default=8, help="number of text windows (batch size)")
    ap.add_argument("--chunk-tokens", type=positive_int, default=128, help="tokens per window")
    ap.add_argument("--min-agreement", type=fraction, default=0.9,
                    help="top-1 agreement the suggested skip set keeps (0 to 1)")
    ap.add_argument("--max-skip", type=proper_fraction, default=0.5,
                    help="most layers (a fraction >= 0 and < 1) the suggestion skips")
    ap.add_argument("--void-alpha", type=positive_float, default=0.8, help="LAC threshold factor for void layers")
    ap.add_argument("--no-plots", action="store_true", help="write JSON only")
    ap.add_argument("--json", action="store_true", help="print the report as JSON instead of the summary")
    args = ap.parse_args(argv)

    text = Path(args.text)
    if not text.is_file():
        raise UsageError(f"--text {args.text}: no such file; pass a text file to analyse the model on "
                         "(e.g. --text some_module.py)")
    try:
        model, tokenizer = load_lm(args.model)
    except (FileNotFoundError, ValueError) as e:  # unknown name, untrained zoo model, not a language model
        raise UsageError(f"--model {args.model}: {e}") from None
    try:
        ids = chunk_text(tokenizer, text.read_text(errors="replace"), args.chunks, args.chunk_tokens)
    except ValueError as e:
        raise UsageError(f"--text {args.text}: {e}") from None
    report = depth_report(model, ids, min_agreement=args.min_agreement, max_skip=args.max_skip,
                          void_alpha=args.void_alpha)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    report.to_json(out / "depth.json")
    try:
        written = [] if args.no_plots else report.plot(out)
    except ImportError as e:  # matplotlib is the optional 'analysis' extra
        raise UsageError(f"{e} (or pass --no-plots); {out / 'depth.json'} is written") from None
    if args.json:
        print((out / "depth.json").read_text())
        return 0
    print(summary(report))
    print(f"wrote {out / 'depth.json'}" + "".join(f", {p.name}" for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(run("analyze", main))
