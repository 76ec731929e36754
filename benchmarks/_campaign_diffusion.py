"""The diffusion section of ``gpu_campaign.py``: ``diffusion_gpu.py`` with a reduced method list, plus host syncs.

``diffusion_gpu.py`` already measures SD 1.5's UNet, a Flux-width and a Wan-width transformer at real
shapes against FirstBlockCache, MagCache, TaylorSeer and cache-dit, eager and with regional compile.
This section runs its ``main`` with the models (``--diffusion-models``, default flux, sd15, wan:
Flux first, the issue's headline shape) and methods (``--diffusion-only``) that fit the campaign's
budget; it writes ``<stem>_diffusion.json`` / ``.md`` row by row, so :func:`collect` reads whatever
finished, also after the section's process was killed at its time limit. Before that, one untimed
3-step trajectory of the first transformer under ``torch.cuda.set_sync_debug_mode("error")``, plain and
with mmskip's inheritance, says whether either makes a host sync.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from _campaign_rows import Context, host_sync

__all__ = ["ONLY", "collect", "run"]

# every mmskip inheritance config and one setting of each peer (diffusion_gpu.py --only substrings)
ONLY = "mmskip FI every 2,mmskip FI every 3,mmskip FI adaptive,FirstBlockCache 0.05,MagCache 0.06,DBCache F1B0 0.08"
SMOKE_ONLY = "mmskip FI every 2,FirstBlockCache 0.05"


def results_path(ctx: Context) -> Path:
    out = ctx.out or Path("gpu_campaign.json")
    return out.with_name(f"{out.stem}_diffusion.json")


def argv(ctx: Context) -> list[str]:
    """``diffusion_gpu.py``'s arguments for this campaign."""
    a = ctx.args
    only = a.diffusion_only or (SMOKE_ONLY if ctx.smoke else ONLY)
    out = ["--models", a.diffusion_models, "--only", only, "--repeats", str(a.diffusion_repeats), "--out", str(results_path(ctx))]
    return [*out, "--smoke", "--no-compile"] if ctx.smoke else out


def _sync_rows(ctx: Context) -> None:
    """Host syncs of a short trajectory on the first transformer model, plain and with inheritance every 2."""
    from _gpu_denoisers import BUILDERS
    from mmskip.diffusion import FeatureInheritanceConfig

    import mmskip
    from mmskip.schedules import interval

    name = next((m for m in ctx.args.diffusion_models.split(",") if m in ("flux", "wan")), None)
    if name is None:
        return
    dims = argparse.Namespace(flux_layers=(4, 8), wan_layers=8, wan_frames=5)  # diffusion_gpu.py's defaults
    holder: dict[str, Any] = {}

    def build() -> dict[str, Any]:
        torch.manual_seed(0)
        holder["b"] = BUILDERS[name][0](ctx.device, ctx.smoke, 3, dims)
        return {"note": holder["b"].shape}

    def check(config: Any) -> dict[str, Any]:
        b = holder["b"]
        x0 = torch.randn(*b.latent, generator=torch.Generator().manual_seed(0)).to(ctx.device)

        def trajectory() -> None:
            x = x0
            for i in range(b.steps):
                x = b.step(x, i)

        if config is None:
            return {"host_sync": host_sync(trajectory, ctx.device)}
        h = mmskip.apply(b.model, config)
        try:
            return {"host_sync": host_sync(trajectory, ctx.device), "mmskip_stats": h.stats().get("inherited_steps")}
        finally:
            h.remove()

    model = f"{name} (sync check, 3 steps)"
    row = ctx.attempt(model, "(build)", 1, "eager", build, need_s=10.0)
    if "b" not in holder:
        return
    del row
    ctx.attempt(model, "baseline", 1, "eager", lambda: check(None))
    ctx.attempt(model, "mmskip FI every 2", 1, "eager",
                lambda: check(FeatureInheritanceConfig(schedule=interval(2), measure_flops=False)))
    del holder["b"]
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def run(ctx: Context) -> None:
    """The host-sync rows, the attention-backend rows, then ``diffusion_gpu.main`` (its rows are read by :func:`collect`)."""
    import diffusion_gpu

    _sync_rows(ctx)
    import _campaign_attention

    _campaign_attention.run(ctx)  # small zoo pipelines: seconds, before the real shapes take the rest
    path = results_path(ctx)
    path.unlink(missing_ok=True)  # collect() must not read an earlier run's rows
    print(f"[diffusion] diffusion_gpu.py {' '.join(argv(ctx))}", flush=True)
    rc = diffusion_gpu.main(argv(ctx))
    if rc:
        raise RuntimeError(f"diffusion_gpu.main returned {rc}")


def collect(ctx: Context) -> list[dict[str, Any]]:
    """``diffusion_gpu.py``'s rows (as many as finished) in the campaign's row format."""
    path = results_path(ctx)
    if not path.exists():
        return []
    res = json.loads(path.read_text())
    models = res.get("models", {})
    rows = []
    common = {"section": "diffusion", **ctx.meta, "host_sync": "not checked here (see the sync-check rows)",
              "source": path.name}
    for r in res.get("rows", []):
        info = models.get(r["model"], {})
        speed = r.get("speedup")
        spread = r.get("speedup_spread") or ([speed, speed] if speed is not None else None)
        row = {**common, "model": f"{r['model']}: {info.get('shape', '')}".rstrip(": "), "technique": r["method"],
               "batch": 1, "mode": "compiled (regional)" if r.get("compile") else "eager", "dtype": r.get("dtype"),
               "speedup": speed, "spread": spread, "iqr": spread[1] - spread[0] if spread else None,
               "paired": "paired_speedup" in r or "speedup_spread" in r, "flops_bound": r.get("bound"),
               **{k: r[k] for k in ("s_per_traj", "psnr", "rel_l2", "compile_s", "peak_mem_gb", "error", "skipped",
                                    "steps") if k in r}}
        if info.get("steps"):
            row["steps"] = info["steps"]
        rows.append(row)
    wanted = [m for m in ctx.args.diffusion_models.split(",") if m]
    done = {r["model"] for r in res.get("rows", [])}
    rows += [{**common, "model": m, "technique": "(all)", "batch": 1, "mode": "-",
              "skipped": "not reached before the section's time limit"} for m in wanted if m not in done]
    for r in rows:
        print(f"[diffusion] {r['model'][:40]} | {r['technique']} | {r['mode']}: "
              f"{r.get('error') or r.get('skipped') or format(r.get('speedup') or 0, '.2f') + 'x'}", flush=True)
    return rows
