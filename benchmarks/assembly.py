"""A-SDM's tuning half on the zoo's digits-sd: the assembled UNet, ME-CondConv, multi-UNet switching.

DPM-Solver++ 2M at 25 steps, CFG 4, CPU, the same conditions and seeds for every method (the
measuring of ``benchmarks/diffusion.py``: paired wall time, whole-pipeline FLOPs bound, PSNR/SSIM
to the baseline's images, FID / CLIP score / accuracy), for

* the full UNet and the fewer-steps front (DPM++ at fewer steps);
* the assembled UNet (``mmskip.diffusion.assembly``; zoo ``digits-sd-assembled`` or ``--assembled``)
  with and without ME-CondConv;
* BK-SDM-style removal of the same parts without distillation (the trivial peer);
* multi-UNet switching (``UNetSwitchConfig``) at two switch points, full UNet first and last;
* each combined with feature inheritance (DeepCache-shaped, every 2nd step).

Also the UNet's parameters and FLOPs per step for each network. Writes
``benchmarks/results/assembly.json`` / ``.md`` / ``assembly_pareto.png``.

    python benchmarks/assembly.py                      # ~25 min on one CPU thread
    python benchmarks/assembly.py --smoke              # every code path on tiny models, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _diffusion_methods as dm
import _diffusion_models as zm
import harness
import torch

import diffusion as bench

FI_SPEC = "fi=interval:2 targets=deepcache"


def _swap(unet: torch.nn.Module, then: Callable[[Any], Callable[[], None] | None] | None = None) -> dm.Setup:
    """Run the pipeline with ``unet`` in place of its own (optionally with a further setup)."""

    def setup(model: Any) -> Callable[[], None]:
        own = model.pipe.unet
        model.pipe.unet = unet
        try:
            undo = then(model) if then is not None else None
        except Exception:
            model.pipe.unet = own
            raise

        def teardown() -> None:
            if undo is not None:
                undo()
            model.pipe.unet = own

        return teardown

    return setup


def _switch(folder: Path, fraction: float, full_first: bool, fi: bool) -> dm.Setup:
    def setup(model: Any) -> Callable[[], None]:
        from mmskip.diffusion import UNetSwitchConfig

        configs: list[Any] = [UNetSwitchConfig(light=str(folder), full_fraction=fraction, full_first=full_first)]
        if fi:
            configs.append(_fi(model))
        model.pipe.enable_skip(configs)
        return model.pipe.disable_skip

    return setup


def _fi(model: Any) -> Any:
    from mmskip.diffusion import FeatureInheritanceConfig

    from mmskip.schedules import interval

    targets = dm.targets_for(model, "deepcache") if model.kind == "sd" else None
    return FeatureInheritanceConfig(interval(2), targets=targets, measure_flops=False)


def _fi_setup(model: Any) -> Callable[[], None]:
    model.pipe.enable_skip(_fi(model))
    return model.pipe.disable_skip


def _networks(args: argparse.Namespace, model: zm.ZooModel) -> tuple[Path, dict[str, torch.nn.Module]]:
    """The assembled folder and the UNets: ``assembled``, ``condconv``, ``removed`` (same edits, not distilled)."""
    from mmskip.diffusion.assembly import assemble_unet, load_assembled, save_assembled

    if args.smoke:  # a tiny assembled UNet next to the tiny pipeline
        folder = Path(tempfile.mkdtemp()) / "assembled"
        light = assemble_unet(model.pipe.unet, ["mid"])
        save_assembled(light, folder / "unet")
        from mmskip.diffusion.assembly import insert_condconv

        cc = assemble_unet(model.pipe.unet, ["mid"])
        insert_condconv(cc, num_experts=2)
        save_assembled(cc, folder / "unet_condconv")
        (folder / "assembly.json").write_text(json.dumps({"edits": ["mid"]}))
    else:
        folder = args.assembled
        if folder is None:
            from mmskip import zoo

            folder = zoo.path("digits-sd-assembled")
    edits = json.loads((Path(folder) / "assembly.json").read_text())["edits"]
    nets = {"assembled": load_assembled(Path(folder) / "unet"),
            "removed": assemble_unet(model.pipe.unet, edits).eval()}
    if (Path(folder) / "unet_condconv").is_dir():
        nets["condconv"] = load_assembled(Path(folder) / "unet_condconv")
    return Path(folder), nets


def make_methods(args: argparse.Namespace, record: dict[str, Any]) -> Callable[[zm.ZooModel, str | None], list[dm.Method]]:
    def build(model: zm.ZooModel, stats_path: str | None) -> list[dm.Method]:
        from mmskip.diffusion.assembly import flops_per_call, parameter_count

        folder, nets = _networks(args, model)
        u = model.pipe.unet
        z = torch.randn(2, u.config.in_channels, u.config.sample_size, u.config.sample_size)
        ctx = torch.randn(2, 16, u.config.cross_attention_dim)
        t = torch.tensor([500, 500])
        full_flops = flops_per_call(u, z, t, ctx)
        record["networks"] = {"full": {"parameters": parameter_count(u), "flops_per_step": 1.0}}
        for k, net in nets.items():
            record["networks"][k] = {"parameters": parameter_count(net), "flops_per_step": flops_per_call(net, z, t, ctx) / full_flops}
        record["edits"] = json.loads((folder / "assembly.json").read_text())["edits"]
        label = dm.sampler_label(model)
        ms = [dm.Method(f"baseline {label}-{model.steps}", "baseline", dm._none),
              dm.Method(f"baseline {label}-{model.steps}, other seeds", "noise-floor", dm._none, seed_offset=1000),
              *dm.front_for(model),
              dm.Method("assembled (distilled)", "assembly", _swap(nets["assembled"])),
              dm.Method("BK-SDM-style removal, not distilled", "removal", _swap(nets["removed"]))]
        if "condconv" in nets:
            ms.append(dm.Method("assembled + ME-CondConv", "assembly", _swap(nets["condconv"])))
        for frac in (0.5, 0.3):
            ms.append(dm.Method(f"switch: full first {frac:.0%}, then assembled", "assembly",
                                _switch(folder, frac, True, False)))
        ms.append(dm.Method("switch: assembled first 50%, then full", "assembly", _switch(folder, 0.5, False, False)))
        ms.append(dm.Method(f"mmskip FI ({FI_SPEC})", "mmskip", _fi_setup))
        ms.append(dm.Method(f"assembled + FI ({FI_SPEC})", "assembly+fi", _swap(nets["assembled"], _fi_setup)))
        if "condconv" in nets:
            ms.append(dm.Method(f"assembled + ME-CondConv + FI ({FI_SPEC})", "assembly+fi",
                                _swap(nets["condconv"], _fi_setup)))
        for frac in (0.5, 0.3):
            ms.append(dm.Method(f"switch full first {frac:.0%} + FI", "assembly+fi", _switch(folder, frac, True, True)))
        ms.append(dm.Method("DPM++2M-15 + assembled + FI", "assembly+fi", _swap(nets["assembled"], _fi_setup),
                            steps=15))
        return ms

    return build


def main(argv: list[str] | None = None) -> int:
    ap = harness.arguments(__doc__, full_doc=True, smoke="every code path on tiny models, seconds")
    ap.add_argument("--assembled", type=Path, default=None, help="the recipe's output folder (default: the zoo's)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--time-batch", type=int, default=50)
    args = ap.parse_args(argv)
    harness.setup(args)
    args.sampler, args.steps, args.guidance, args.specs, args.only, args.seed = None, None, None, [], None, 0
    if args.smoke:
        args.n, args.steps, args.repeats, args.batch, args.time_batch = 2, 4, 1, 2, 2
    out = args.out or harness.RESULTS / ("assembly_smoke.json" if args.smoke else "assembly.json")
    args.out = out
    out.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {}
    res = bench.run_model("digits-sd", args, make_methods(args, record))
    res.update(record)
    results = {"torch_threads": torch.get_num_threads(), "device": "cpu", "n": args.n, "guidance_scale": 4.0,
               "repeats": args.repeats, "models": {"digits-sd": res}}
    nets = "\n".join(f"- {k}: {v['parameters']:,} parameters, {v['flops_per_step']:.3f} of the full UNet's FLOPs per step"
                     for k, v in record["networks"].items())
    text = f"Removed by assembly: {', '.join(record['edits'])}\n\n{nets}\n\n" + bench.print_table("digits-sd", res)
    bench.COLORS.update({"assembly": "tab:brown", "removal": "tab:pink", "assembly+fi": "tab:orange"})
    harness.write(out, results, text, lambda png: bench.plot(results, png), out.with_name(out.stem + "_pareto.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
