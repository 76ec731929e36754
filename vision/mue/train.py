"""Layer-wise training for MuE: make every decoder layer (and every encoder layer) of a Florence-2 exitable.

    python -m mmskip.vision.mue.train --model digits-florence --out runs/mue-ft --steps 300
    python -m mmskip.vision.mue.train --model digits-florence --out runs/mue-ft --steps 600 --resume

MuE (Tang et al., CVPR 2023, arXiv:2211.11152) exits a token at an intermediate layer and reads the exit
layer's state as if it were the last one, so the model is trained for that ("layer-wise training"):

* **Decoder:** every decoder layer's output goes through the shared LM head (Florence-2's BART decoder is
  post-LN and has no final layer norm: the LM head reads a layer's output as is) and gets the
  teacher-forced cross-entropy; the loss is the mean over the layers (the paper's sum divided by the depth,
  so the learning rate means the same at any depth).
* **Encoder:** an encoder token that exits keeps its exit layer's state, so the decoder must read a
  *mixture* of encoder depths. Each step the decoder is run a second time on a memory where every encoder
  token's state is taken from a layer drawn uniformly from 1..depth (independently per token, as
  token-level exits give), with the same layer-wise loss; ``encoder_mix`` weights that term (0 = decoder
  only). This trains the intermediate encoder states to be usable by the decoder, the property MuE's encoder
  exits need; the paper's own encoder objective is not reproduced here (see ``vision/mue/README.md``).

:func:`layerwise_loss` computes the loss on one batch; :func:`train_mue` trains a model with it (AdamW,
warm-up + cosine, progress bar, ``out/checkpoint/`` every ``checkpoint_every`` steps, ``resume=True``
continues it, final weights as safetensors). The CLI fine-tunes an existing Florence-2 (a zoo name or a
``from_pretrained`` folder with its tokenizer) on the ``digits-florence`` tasks
(:mod:`mmskip.zoo.florence_data`) and prints held-out exact match per task before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmskip.train.batches import StepBatches, loss_curve_trailing, to_device
from mmskip.train.checkpoint import STATE_PATH, legacy_note
from mmskip.train.config import TrainConfig
from mmskip.train.loop import TrainTask, fit

__all__ = ["CHECKPOINT", "layerwise_loss", "mixed_depth", "train_mue", "main"]

CHECKPOINT = STATE_PATH  # under ``out``: the state file of the checkpoint folder (mmskip.train.checkpoint)
PROG = "python -m mmskip.vision.mue.train"
MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "labels", "decoder_input_ids", "decoder_attention_mask")


def _text(model: nn.Module) -> nn.Module:
    try:
        return model.model.language_model
    except AttributeError:
        raise TypeError(f"layer-wise MuE training needs a Florence2ForConditionalGeneration, got "
                        f"{type(model).__name__}") from None


def _layer_ces(model: nn.Module, hidden: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each layer's output (``hidden[1:]``, the embeddings dropped) through the LM head."""
    flat = labels.reshape(-1)
    return torch.stack([F.cross_entropy(model.lm_head(h).float().flatten(0, 1), flat, ignore_index=-100)
                        for h in hidden[1:]])


def mixed_depth(hidden: tuple[torch.Tensor, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """Encoder memory where each token's state comes from a layer drawn uniformly from 1..depth
    (``hidden`` = embeddings + one entry per layer, as ``output_hidden_states`` gives)."""
    layers = torch.stack(hidden[1:])  # (L, B, N, d)
    L, B, N, _ = layers.shape
    pick = torch.randint(0, L, (B, N), generator=generator).to(layers.device)
    return torch.gather(layers, 0, pick[None, :, :, None].expand(1, B, N, layers.shape[-1]))[0]


def layerwise_loss(model: nn.Module, batch: Mapping[str, Any], *, encoder_mix: float = 1.0,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """MuE's layer-wise loss of ``model`` (``Florence2ForConditionalGeneration``) on one batch.

    ``batch`` holds ``input_ids``, ``attention_mask``, ``pixel_values`` and decoder ``labels`` (-100 =
    ignored; the decoder input is ``labels`` shifted right after ``decoder_start_token_id``, as the model's
    own loss does). Returns ``(loss, parts)``: ``loss = mean_l CE(lm_head(decoder layer l)) + encoder_mix *
    mean_l CE(...)`` of the decoder re-run on a mixed-depth encoder memory (:func:`mixed_depth`);
    ``parts`` has ``decoder`` (per-layer CEs, a list), ``encoder_mix`` (the same on the mixed memory, or
    ``None``) and ``final`` (the last layer's CE = the model's plain loss), as floats.
    """
    from transformers.models.bart.modeling_bart import shift_tokens_right

    text = _text(model)
    labels = batch["labels"]
    cfg = text.config
    dec_in = batch.get("decoder_input_ids")
    if dec_in is None:
        dec_in = shift_tokens_right(labels, cfg.pad_token_id, cfg.decoder_start_token_id)
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                pixel_values=batch.get("pixel_values"), decoder_input_ids=dec_in,
                decoder_attention_mask=batch.get("decoder_attention_mask"), use_cache=False, output_hidden_states=True)
    dec = _layer_ces(model, out.decoder_hidden_states, labels)
    loss = dec.mean()
    parts: dict[str, Any] = {"decoder": dec.detach().tolist(), "final": float(dec[-1].detach()), "encoder_mix": None}
    if encoder_mix:
        memory = mixed_depth(out.encoder_hidden_states, generator)
        mixed = text.decoder(input_ids=dec_in, attention_mask=batch.get("decoder_attention_mask"),
                             encoder_hidden_states=memory, encoder_attention_mask=batch.get("attention_mask"),
                             use_cache=False, output_hidden_states=True)
        mix = _layer_ces(model, mixed.hidden_states, labels)
        loss = loss + encoder_mix * mix.mean()
        parts["encoder_mix"] = mix.detach().tolist()
    return loss, parts


class _LayerwiseTask(TrainTask):
    """Every parameter of a Florence-2 (and ``aux_module``'s) trained for :func:`layerwise_loss` (:func:`fit`)."""

    def __init__(self, model: nn.Module, data: StepBatches, *, steps: int, encoder_mix: float, seed: int,
                 aux_loss: Callable[[Mapping[str, Any]], torch.Tensor] | None, aux_module: nn.Module | None,
                 desc: str) -> None:
        self.model, self.data, self.steps, self.encoder_mix, self.seed = model, data, steps, encoder_mix, seed
        self.aux_loss, self.aux_module, self.desc = aux_loss, aux_module, desc
        self.device = next(model.parameters()).device
        self.every = max(1, steps // 20)
        self.losses: list[float] = []
        self.layer_curve: list[list[Any]] = []
        self._parts: dict[str, Any] = {}
        self._last: torch.Tensor | None = None

    def _modules(self) -> list[tuple[str, nn.Module]]:
        return [("model.", self.model)] + ([("aux.", self.aux_module)] if self.aux_module is not None else [])

    def weights(self) -> dict[str, torch.Tensor]:
        return {f"{pre}{n}": p for pre, m in self._modules() for n, p in m.named_parameters()}

    def param_groups(self, config: TrainConfig) -> list[dict[str, Any]]:
        """Weight decay on matrices other than embeddings (the shared token table included); none elsewhere."""
        named = list(self.model.named_parameters()) + ([(f"aux.{n}", p) for n, p in self.aux_module.named_parameters()]
                                                       if self.aux_module is not None else [])
        decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n and "shared" not in n]
        ids = {id(p) for p in decay}
        return [{"params": decay, "weight_decay": config.weight_decay},
                {"params": [p for _, p in named if id(p) not in ids], "weight_decay": 0.0}]

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Persistent buffers (e.g. normalisation statistics), so a resumed run continues the same state."""
        out = {}
        for pre, m in self._modules():
            kept = set(m.state_dict())
            out.update({f"{pre}{n}": b for n, b in m.named_buffers() if n in kept})
        return out

    def prepare(self, accelerator: Any) -> None:
        self.model.train()

    def batch(self, step: int) -> dict[str, Any]:
        return to_device(self.data.at(step), self.device)

    def loss(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        loss, self._parts = layerwise_loss(self.model, batch, encoder_mix=self.encoder_mix, generator=g)
        self._last = loss.detach()
        terms = {"layerwise": loss}
        if self.aux_loss is not None:
            terms["aux"] = self.aux_loss(batch)
        return terms

    def metrics(self) -> dict[str, float]:
        return {"last_layer": self._parts["final"]} if self._parts else {}

    def after_step(self, step: int) -> None:
        self.losses.append(round(float(self._last), 5))
        done, parts = step + 1, self._parts
        if done % self.every == 0 or done == self.steps:
            mix = parts["encoder_mix"]
            self.layer_curve.append([done, [round(v, 4) for v in parts["decoder"]],
                                     None if mix is None else round(sum(mix) / len(mix), 4)])

    def state(self) -> dict[str, Any]:
        return {"losses": self.losses, "layer_curve": self.layer_curve}

    def load_state(self, state: dict[str, Any]) -> None:
        self.losses, self.layer_curve = list(state["losses"]), list(state.get("layer_curve", []))

    def finish(self) -> None:
        self.model.eval()


def train_mue(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    steps: int,
    out: str | Path,
    lr: float = 1e-3,
    warmup: int = 100,
    weight_decay: float = 0.05,
    encoder_mix: float = 1.0,
    clip: float | None = 1.0,
    resume: bool = False,
    checkpoint_every: int = 100,
    aux_loss: Callable[[Mapping[str, Any]], torch.Tensor] | None = None,
    aux_module: nn.Module | None = None,
    seed: int = 0,
    save: bool = True,
    progress: bool = True,
    desc: str = "MuE layer-wise",
) -> dict[str, Any]:
    """Train every parameter of ``model`` (a ``Florence2ForConditionalGeneration``) with
    :func:`layerwise_loss` for ``steps`` steps in all; returns the training record.

    ``batches`` yields dicts with the model keys (``input_ids``, ``attention_mask``, ``pixel_values``,
    ``labels``; other keys are left for ``aux_loss``) and must last ``steps`` batches (a resumed run skips
    the ones already used, so it sees what an uninterrupted run would have). ``aux_loss(batch)`` adds a
    training-only term computed after the model's forward (e.g. a probe on captured features);
    ``aux_module``'s parameters are optimised and checkpointed with the model's.

    One :class:`~mmskip.train.TrainTask` of :func:`mmskip.train.fit`: AdamW (``lr``, betas 0.9/0.98,
    ``weight_decay`` on matrices other than embeddings), ``warmup`` linear warm-up steps then cosine to
    5 % (``TrainConfig(lr_schedule="cosine", min_lr_ratio=0.05)``), gradient norm clipped to ``clip``.
    ``out/checkpoint/`` (:mod:`mmskip.train.checkpoint`: model, aux module, optimizer, step, losses,
    seconds) is written every ``checkpoint_every`` steps and at the end;
    ``resume=True`` continues it (``FileNotFoundError`` without one). The mixed-depth draws use a generator
    seeded by ``(seed, step)``, so a resumed run is the same run. With ``save`` the final weights go to
    ``out`` with ``save_pretrained`` (safetensors, the model's dtype). The model is left in eval mode.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    _text(model)
    out = Path(out)
    start = 0
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise FileNotFoundError(f"resume: no checkpoint in {str(out)!r} (expected {CHECKPOINT}); start without "
                                    f"resume to train from scratch{legacy_note(out)}")
        saved = json.loads((out / CHECKPOINT).read_text())
        start = int(saved["step"])
        if "task" not in saved:
            raise ValueError(f"the checkpoint in {str(out)!r} was written by an earlier mmskip (before the one "
                             "training loop) that this one cannot continue: finish it with that version, or start anew")
    task = _LayerwiseTask(model, StepBatches(batches, steps), steps=steps, encoder_mix=encoder_mix, seed=seed,
                          aux_loss=aux_loss, aux_module=aux_module, desc=desc)
    config = TrainConfig(steps=steps, lr=lr, warmup=warmup, lr_schedule="cosine", min_lr_ratio=0.05,
                         weight_decay=weight_decay, betas=(0.9, 0.98), max_grad_norm=clip or 0.0,
                         save_every=checkpoint_every, seed=seed, cpu=task.device.type == "cpu")
    result = fit(task, config, out=out, resume=resume, progress=progress)
    seconds, losses = result.seconds, task.losses
    if save:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
    return {"trainer": "mmskip.vision.mue.train", "steps": len(losses), "lr": lr, "warmup": warmup,
            "encoder_mix": encoder_mix, "train_seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / max(1, len(losses) - start), 4) if len(losses) > start else None,
            "loss_curve": loss_curve_trailing(losses), "layer_curve": task.layer_curve, "losses": losses}


# -- CLI: fine-tune a Florence-2 on the digits-florence tasks --------------------------------------------


def _load(name: str) -> tuple[nn.Module, Any]:
    from transformers import AutoTokenizer, Florence2ForConditionalGeneration

    from mmskip import zoo

    folder = zoo.path(name) if name in zoo.NAMES else Path(name)
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"--model {name!r} is neither a zoo name nor a folder")
    model = Florence2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def digit_batches(tokenizer: Any, batch: int, seed: int) -> Iterator[dict[str, Any]]:
    """An endless stream of ``digits-florence`` training batches (train digits, fixed seed)."""
    from mmskip.zoo import florence_data as D

    g = torch.Generator().manual_seed(seed)
    bank = D.digit_bank("train", copies=4, seed=seed)
    while True:
        images, slots = D.make_strips(bank, batch, g)
        b = D.make_batch(tokenizer, images, *D.sample_tasks(slots, g), slots)
        yield {**b.model_inputs(), "slots": b.slots}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits-florence", help="zoo name or from_pretrained folder (with tokenizer)")
    ap.add_argument("--out", required=True, help="folder for the checkpoint, the weights and eval.json")
    ap.add_argument("--steps", type=int, default=300, help="training steps in all (a resumed run counts the earlier ones)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--encoder-mix", type=float, default=1.0, help="weight of the mixed-depth encoder term (0: off)")
    ap.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1, help="training data stream seed")
    ap.add_argument("--eval-n", type=int, default=50, help="held-out strips per task (0: no evaluation)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if (Path(a.out) / CHECKPOINT).exists() and not a.resume:
        print(f"{PROG}: error: {a.out} already has {CHECKPOINT}; pass --resume to continue it", file=sys.stderr)
        return 2
    try:
        model, tok = _load(a.model)
    except (FileNotFoundError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    from mmskip.zoo import florence_data as D

    held = D.heldout_set(tok, n_per_task=a.eval_n) if a.eval_n else None
    before = D.score(D.answers(model, tok, held), held) if held else None
    rec = train_mue(model, digit_batches(tok, a.batch, a.seed), steps=a.steps, out=a.out, lr=a.lr, warmup=a.warmup,
                    encoder_mix=a.encoder_mix, resume=a.resume, checkpoint_every=a.checkpoint_every, seed=a.seed)
    tok.save_pretrained(a.out)
    after = D.score(D.answers(model, tok, held), held) if held else None
    rec.pop("losses")
    result = {"model": a.model, "before": before, "after": after, **rec}
    (Path(a.out) / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"before": before, "after": after, "train_seconds": rec["train_seconds"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
