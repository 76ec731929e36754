"""Zoo recipes: a full ControlNet and a RelaCtrl branch for ``scenes-flux``, layout-controlled by silhouettes.

``scenes-flux-controlnet``: diffusers' ``FluxControlNetModel.from_transformer`` with a copy of
every base block (2 dual + 4 single: the PixArt-δ / InstantX layout at full depth), trained with
the base frozen; then RelaCtrl's relevance analysis on it (``relevance.json``, ``relevance.png``).
``scenes-flux-relactrl``: :func:`allocate` puts ``num_blocks`` TDSM blocks at the most relevant
positions of that analysis, and :class:`RelaCtrlFluxNet` is trained the same way.

Both folders hold only the control branch (fp16) and a model card; :func:`load_pipeline` builds
``FluxControlNetPipeline`` from ``scenes-flux``'s components and the branch.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from mmskip.zoo.scenes_data import SAMPLING as SCENES_SAMPLING

from .allocate import allocate
from .branch import RelaCtrlFluxNet
from .relevance import RelevanceReport, generate_controlled, relevance
from .train import ControlData, ControlTrainConfig, train_control

__all__ = ["load_pipeline", "control_data", "evaluate_control", "train_scenes_controlnet",
           "train_scenes_relactrl", "SAMPLING", "base_pipeline", "test_controls"]

logger = logging.getLogger(__name__)

N_TRAIN = 12000
NUM_BLOCKS = 3
# the shipped branches were each trained for the same 170 s on one H200; these are the steps that bought
BATCH = 128
CONTROLNET_STEPS = 3025
RELACTRL_STEPS = 4000
SAMPLING = {**SCENES_SAMPLING, "num_inference_steps": 28}


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _zoo_folder(out: Path, name: str) -> Path:
    """A sibling folder of ``out`` written by the same run, else the shipped zoo model."""
    sibling = Path(out).parent / name
    if (sibling / "README.md").is_file() or (sibling / "model_index.json").is_file():
        return sibling
    from mmskip.zoo import path

    return path(name)


def base_pipeline(out: Path, device: torch.device | str = "cpu") -> Any:
    """``scenes-flux`` (beside ``out`` if this run wrote one, else the shipped one), float32."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(_zoo_folder(out, "scenes-flux"), dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(folder: str | Path, base: Any = None, **kwargs: Any) -> Any:
    """``FluxControlNetPipeline`` = ``scenes-flux`` (or ``base``) + the control branch in ``folder``."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    folder = Path(folder)
    dtype = kwargs.pop("dtype", torch.float32)
    cls_name = json.loads((folder / "config.json").read_text())["_class_name"]
    cls = {"FluxControlNetModel": FluxControlNetModel, "RelaCtrlFluxNet": RelaCtrlFluxNet}.get(cls_name)
    if cls is None:
        raise ValueError(f"{folder} holds a {cls_name}; expected FluxControlNetModel or RelaCtrlFluxNet")
    controlnet = cls.from_pretrained(folder, dtype=dtype)
    if base is None:
        from diffusers import FluxPipeline

        base = FluxPipeline.from_pretrained(_zoo_folder(folder, "scenes-flux"), dtype=dtype, **kwargs)
    return FluxControlNetPipeline(**base.components, controlnet=controlnet)


@torch.no_grad()
def control_data(pipe: Any, n: int = N_TRAIN, device: torch.device | str = "cpu", workers: int = 8) -> ControlData:
    """Encoded training data: scene latents, silhouette latents (posterior), text embeddings."""
    from mmskip.zoo.scenes_control import control_images, make_control_split
    from mmskip.zoo.scenes_data import scenes_tensor

    images, captions, _ = make_control_split("train", n, workers=workers)
    vae = pipe.vae.to(device)
    sf, sc = vae.config.shift_factor, vae.config.scaling_factor
    x = scenes_tensor(images)
    ctrl = control_images(images) * 2 - 1
    lat, mean, std = [], [], []
    for i in range(0, n, 1000):
        lat.append((vae.encode(x[i:i + 1000].to(device)).latent_dist.mode() - sf) * sc)
        d = vae.encode(ctrl[i:i + 1000].to(device)).latent_dist
        mean.append((d.mean - sf) * sc)
        std.append(d.std * sc)
    embeds, pooled = [], []
    for i in range(0, n, 1000):
        e, p, _ = pipe.encode_prompt(captions[i:i + 1000], None, device=device, max_sequence_length=16)
        embeds.append(e)
        pooled.append(p)
    empty_e, empty_p, _ = pipe.encode_prompt([""], None, device=device, max_sequence_length=16)
    return ControlData(torch.cat(lat), torch.cat(mean), torch.cat(std), torch.cat(embeds), torch.cat(pooled),
                       empty_e, empty_p)


def test_controls(n: int, split: str = "test") -> tuple[list[str], torch.Tensor, Any, Any]:
    """Held-out prompts, their silhouettes, their scenes and images (uint8)."""
    from mmskip.zoo.scenes_control import control_images, make_control_split

    images, captions, scenes = make_control_split(split, n)
    return captions, control_images(images), scenes, images


def _metrics(classifier: Any, real: torch.Tensor) -> tuple[Any, Any]:
    from mmskip.eval.fid import scenes_fid
    from mmskip.zoo.scenes_control import mask_iou

    return (lambda images: scenes_fid(real, images, classifier)), (lambda images, controls: mask_iou(images, controls))


def _classifier(out: Path | None) -> Any:
    """``scenes-classifier`` on the CPU (beside ``out`` if this run wrote one)."""
    from mmskip.zoo import path
    from mmskip.zoo.loaders import load_scenes_classifier

    return load_scenes_classifier(_zoo_folder(out, "scenes-classifier") if out is not None else path("scenes-classifier"))


def evaluate_control(pipe: Any, n: int = 300, seed: int = 0, classifier: Any = None, batch_size: int = 100,
                     **sampling: Any) -> dict[str, float]:
    """FID, prompt accuracy (exact) and silhouette IoU of a ControlNet pipeline on ``n`` held-out scenes."""
    from mmskip.eval.fid import scenes_fid
    from mmskip.zoo.scenes_classifier import prompt_accuracy
    from mmskip.zoo.scenes_control import mask_iou
    from mmskip.zoo.scenes_data import scenes_tensor

    classifier = classifier if classifier is not None else _classifier(None)
    prompts, controls, scenes, images = test_controls(n)
    real = scenes_tensor(images) * 0.5 + 0.5
    fake = generate_controlled(pipe, prompts, controls, seed=seed, batch_size=batch_size, negative_prompt="",
                               **{**SAMPLING, **sampling})
    acc = prompt_accuracy(classifier, fake * 2 - 1, scenes)
    return {"FID": scenes_fid(real, fake, classifier), "prompt accuracy (exact)": acc["exact"],
            "silhouette IoU": mask_iou(fake, controls)}


def _save(model: torch.nn.Module, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu", torch.float16).save_pretrained(out, safe_serialization=True)
    model.float()


def _card(out: Path, name: str, summary: str, recipe: str, metrics: dict[str, Any], wall: float,
          device: torch.device, reproduce: str) -> None:
    from mmskip.zoo.card import write_card

    hardware = f"one {torch.cuda.get_device_name(device)}" if device.type == "cuda" else None
    write_card(out, name, summary, f"{N_TRAIN} procedural scenes (`mmskip.zoo.scenes_control`, seeds apart from "
               "scenes-flux's), each with its silhouette as the control image.", recipe, metrics, wall,
               hardware=hardware, reproduce=reproduce,
               extra="\nMetrics: flow Euler 28 steps, true CFG 4, 300 held-out scenes; "
               "FID on `scenes-classifier` features, prompt accuracy = the classifier reads back every attribute, "
               "silhouette IoU = foreground of the image vs the control.\n")


def _batch_size(device: torch.device) -> int:
    return 300 if device.type == "cuda" else 100


def _train_and_measure(net: torch.nn.Module, pipe: Any, data: ControlData, cfg: ControlTrainConfig, out: Path,
                       eval_n: int, t0: float) -> tuple[torch.nn.Module, Any, dict[str, Any], float]:
    """Train ``net`` (checkpoints in ``out/run``, removed at the end), save it fp16 into ``out`` with
    ``train_info.json``, and measure the saved branch: (EMA branch, its pipeline, metrics, wall time since ``t0``)."""
    net = train_control(net, pipe.transformer, data, cfg, out=out / "run", desc=out.name)
    wall = time.time() - t0
    _save(net, out)
    shutil.rmtree(out / "run", ignore_errors=True)  # the checkpoint is only for resuming
    dev = pipe.transformer.device
    (out / "train_info.json").write_text(json.dumps({"wall_time_s": wall, "steps": net.steps_done, "batch": cfg.batch,
                                                     "device": str(dev)}) + "\n")
    cpipe = load_pipeline(out, base=pipe).to(dev)
    cpipe.set_progress_bar_config(disable=True)
    metrics = evaluate_control(cpipe, n=eval_n, classifier=_classifier(out), batch_size=_batch_size(dev))
    return net, cpipe, metrics, wall


def train_scenes_controlnet(out: Path, steps: int = CONTROLNET_STEPS, device: str | None = None, batch: int = BATCH,
                            relevance_n: int = 200, eval_n: int = 300, n_train: int = N_TRAIN,
                            time_limit_s: float | None = None) -> dict:
    """Train the full ControlNet for ``scenes-flux``, measure it, and run the relevance analysis."""
    from diffusers import FluxControlNetModel

    t0 = time.time()
    torch.manual_seed(0)
    dev = _device(device)
    out = Path(out)
    pipe = base_pipeline(out, dev)
    data = control_data(pipe, n_train, device=dev)
    c = pipe.transformer.config
    net = FluxControlNetModel.from_transformer(pipe.transformer, num_layers=c.num_layers,
                                               num_single_layers=c.num_single_layers,
                                               attention_head_dim=c.attention_head_dim,
                                               num_attention_heads=c.num_attention_heads)
    cfg = ControlTrainConfig(steps=steps, batch=batch, time_limit_s=time_limit_s)
    net, cpipe, metrics, wall = _train_and_measure(net, pipe, data, cfg, out, eval_n, t0)
    classifier = _classifier(out)
    prompts, controls, _, images = test_controls(relevance_n)
    from mmskip.zoo.scenes_data import scenes_tensor

    quality, fidelity = _metrics(classifier, scenes_tensor(images) * 0.5 + 0.5)
    report = relevance(cpipe, prompts, controls, quality_loss=quality, fidelity=fidelity,
                       batch_size=_batch_size(dev), negative_prompt="", **SAMPLING)
    report.save(out / "relevance.json")
    report.plot(out / "relevance.png", title="scenes-flux-controlnet: ControlNet Relevance Score")
    params = sum(p.numel() for p in net.parameters())
    metrics = {**metrics, "control-branch parameters": params, "relevance ranking": ", ".join(report.ranking())}
    _card(out, "scenes-flux-controlnet",
          "Full ControlNet (diffusers `FluxControlNetModel`, a copy of every block) that makes `scenes-flux` follow "
          "a silhouette. Load with `mmskip.zoo.load(\"scenes-flux-controlnet\")` after `import mmskip.diffusion` "
          "(it registers the loader) -> `FluxControlNetPipeline`.",
          f"`FluxControlNetModel.from_transformer(scenes-flux)`, {c.num_layers} dual + {c.num_single_layers} single "
          f"blocks copied, zero-initialised control embedder and projections; base frozen; rectified flow; AdamW "
          f"lr {cfg.lr}, warm-up + cosine, batch {batch}, {net.steps_done} steps, EMA {cfg.ema} (saved, fp16). Then "
          f"RelaCtrl's relevance analysis ({relevance_n} prompts, `relevance.json`, `relevance.png`).",
          metrics, wall, dev, f" --steps {net.steps_done} --batch {batch}")
    return metrics


def train_scenes_relactrl(out: Path, steps: int = RELACTRL_STEPS, device: str | None = None, batch: int = BATCH,
                          num_blocks: int = NUM_BLOCKS, eval_n: int = 300, n_train: int = N_TRAIN,
                          time_limit_s: float | None = None) -> dict:
    """Train RelaCtrl's branch for ``scenes-flux`` at the positions the full ControlNet's analysis ranks first."""
    t0 = time.time()
    torch.manual_seed(0)
    dev = _device(device)
    out = Path(out)
    cn_folder = _zoo_folder(out, "scenes-flux-controlnet")
    if not (cn_folder / "relevance.json").is_file():
        raise FileNotFoundError(f"{cn_folder} has no relevance.json; train scenes-flux-controlnet first "
                                "(mmskip zoo scenes-flux-controlnet)")
    report = RelevanceReport.load(cn_folder / "relevance.json")
    plan = allocate(report, num_blocks)
    pipe = base_pipeline(out, dev)
    data = control_data(pipe, n_train, device=dev)
    net = RelaCtrlFluxNet.from_transformer(pipe.transformer, plan.positions, plan.mlp_ratios)
    cfg = ControlTrainConfig(steps=steps, batch=batch, time_limit_s=time_limit_s)
    net, cpipe, metrics, wall = _train_and_measure(net, pipe, data, cfg, out, eval_n, t0)
    metrics = {**metrics, "control-branch parameters": sum(p.numel() for p in net.parameters()),
               "positions": ", ".join(p.name for p in net.control_positions()),
               "mlp ratios": ", ".join(f"{r:g}" for r in plan.mlp_ratios)}
    _card(out, "scenes-flux-relactrl",
          "RelaCtrl control branch (TDSM blocks at the most relevant positions) for `scenes-flux`, silhouette "
          "control. Load with `mmskip.zoo.load(\"scenes-flux-relactrl\")` after `import mmskip.diffusion` "
          "(it registers the loader) -> `FluxControlNetPipeline`.",
          f"`RelaCtrlFluxNet.from_transformer(scenes-flux)`: {num_blocks} TDSM blocks (4 groups, 4x4 windows) at the "
          f"positions ranked first by `scenes-flux-controlnet/relevance.json`, channel-mixer ratios scaled by "
          f"relevance; base frozen; same loss, optimiser, batch {batch}, {net.steps_done} steps, EMA as the full ControlNet.",
          metrics, wall, dev, f" --steps {net.steps_done} --batch {batch}")
    return metrics
