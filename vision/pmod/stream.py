"""Streaming video into one KV cache, clip by clip, with questions at any time (VideoLLM-online style).

``generate`` cannot continue a cache with a new video clip (transformers recomputes positions
and feature counts for the whole prompt), so :class:`VideoStream` runs its own loop: each
:meth:`~VideoStream.add_clip` runs the model once on the clip's placeholder tokens and pixels
against the cache; :meth:`~VideoStream.ask` feeds a question and decodes greedily, then (by
default) rolls the cache back so the next clip follows the video, not the answer.

With :class:`mmskip.vision.VideoMoDConfig` applied, every clip is routed as it arrives (each
frame keeps its top tokens per layer) and each layer's cache grows only by the tokens it ran:
:meth:`~VideoStream.kv_bytes` / :attr:`~VideoStream.frames` is the memory per streamed frame.

Positions: LLaVA-OneVision (1-D RoPE) continues from the cache length; Qwen2-VL / Qwen2.5-VL
get each chunk's 3-D M-RoPE positions from the model's ``get_rope_index`` on the chunk alone,
shifted to start after the largest position so far (what the whole prompt in one pass gives).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

from mmskip._phase import cache_kwarg
from mmskip.registry import get_adapter

from ..adapters import VLMAdapter

__all__ = ["VideoStream"]

logger = logging.getLogger(__name__)


class VideoStream:
    """One video stream (batch 1) into ``model``'s KV cache.

    Args:
        model: a video-capable model of the ``"vlm"`` registry (LLaVA-OneVision, Qwen2-VL,
            Qwen2.5-VL), with or without an applied mmskip technique.
        prefix: token ids fed first (e.g. the chat template's ``USER :``), shape (n,) or (1, n).

    ::

        stream = VideoStream(model, prefix=tok("USER :"))
        for clip in clips:                      # (frames, 3, H, W) each
            stream.add_clip(clip)
            answer = stream.ask(tok(" how many frames show 4 ? ASSISTANT :"))
    """

    def __init__(self, model: nn.Module, prefix: torch.Tensor | None = None) -> None:
        adapter: VLMAdapter = get_adapter(model, "vlm")
        if not adapter.takes_video:
            raise ValueError(f"VideoStream needs a video model; {type(model).__name__} takes images only")
        self.model, self.adapter = model, adapter
        self.mrope = hasattr(adapter.mm_model, "get_rope_index")  # Qwen2-VL family: 3-D positions
        self.cache: Any = None
        self.length = 0  # tokens fed so far
        self.next_position = 0  # the position the next token gets (M-RoPE: max so far + 1)
        self.frames = 0
        self.clips = 0
        if prefix is not None:
            self.feed(prefix)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- feeding ----------------------------------------------------------------------------
    @torch.no_grad()
    def feed(self, input_ids: torch.Tensor, **inputs: Any) -> torch.Tensor:
        """Run ``input_ids`` (and any multimodal ``inputs`` for them) against the cache; returns
        the logits of the last position, (1, vocab)."""
        ids = torch.as_tensor(input_ids, device=self.device).long()
        if ids.dim() == 1:
            ids = ids[None]
        if ids.shape[0] != 1:
            raise ValueError(f"VideoStream streams one video (batch 1); got input_ids of shape {tuple(ids.shape)}")
        kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": True, **inputs}
        if self.cache is not None:
            kwargs[cache_kwarg(self.model)] = self.cache
        if self.mrope:
            kwargs["position_ids"] = self._mrope_positions(ids, inputs)
        out = self.model(**kwargs)
        cache = out.get("cache")
        self.cache = cache if cache is not None else out.get("past_key_values")
        self.length += ids.shape[1]
        if not self.mrope:
            self.next_position = self.length
        return out.logits[:, -1]

    def add_clip(self, pixel_values_videos: torch.Tensor, **inputs: Any) -> torch.Tensor:
        """Append one clip: ``pixel_values_videos`` as the model's processor makes them for one
        video ((frames, 3, H, W) or (1, frames, 3, H, W) for LLaVA-OneVision; flattened patches
        plus ``video_grid_thw`` in ``inputs`` for Qwen2-VL). Feeds exactly the clip's video
        placeholder tokens (wrapped in ``<|vision_start|>``/``<|vision_end|>`` on Qwen-VL);
        returns the last position's logits."""
        pixels = torch.as_tensor(pixel_values_videos)
        if pixels.numel() == 0:
            raise ValueError(
                f"VideoStream.add_clip got an empty clip (pixel_values_videos of shape {tuple(pixels.shape)}); "
                "pass at least one frame, or skip the call"
            )
        if not self.mrope and pixels.dim() == 4:
            pixels = pixels[None]
        args = {"pixel_values_videos": pixels, **inputs}
        layout = self.adapter.video_layout(args)
        if not layout or len(layout) != 1:
            raise ValueError(
                "VideoStream.add_clip takes one video per call (for Qwen2-VL pass its video_grid_thw with one row)"
            )
        per_frame, frames, trailing = layout[0]
        n = per_frame * frames + trailing
        ids = torch.full((1, n), self.adapter.video_token_ids[0], dtype=torch.long, device=self.device)
        config = self.model.config
        start, end = getattr(config, "vision_start_token_id", None), getattr(config, "vision_end_token_id", None)
        if start is not None and end is not None:  # Qwen-VL wraps every video: <|vision_start|> ... <|vision_end|>
            ids = torch.cat([ids.new_tensor([[start]]), ids, ids.new_tensor([[end]])], dim=1)
        if self.mrope:
            video = ids == self.adapter.video_token_ids[0]
            args["mm_token_type_ids"] = torch.where(video, 2, 0)  # transformers' type ids: 0 text, 2 video
        ref = next(self.model.parameters())
        args["pixel_values_videos"] = pixels.to(ref.device, ref.dtype)
        logits = self.feed(ids, **args)
        self.frames += frames
        self.clips += 1
        return logits

    @torch.no_grad()
    def ask(self, question_ids: torch.Tensor, max_new_tokens: int = 1, eos_token_id: int | None = None,
            keep: bool = False) -> torch.Tensor:
        """Feed a question and decode greedily (at most ``max_new_tokens``, stopping at
        ``eos_token_id``); returns the new token ids, (1, n). Unless ``keep``, the cache is then
        cropped back so the question and answer do not stay in the video's context."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        mark = self._mark()
        logits = self.feed(question_ids)
        new = []
        for step in range(max_new_tokens):
            tok = logits.argmax(-1, keepdim=True)
            new.append(tok)
            if (eos_token_id is not None and int(tok) == eos_token_id) or step == max_new_tokens - 1:
                break
            logits = self.feed(tok)
        if not keep:
            self._rewind(mark)
        return torch.cat(new, dim=1)

    # -- memory -------------------------------------------------------------------------------
    def kv_bytes(self) -> int:
        """Bytes the KV cache holds now (every layer's keys and values)."""
        if self.cache is None:
            return 0
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values)
                   if isinstance(t, torch.Tensor))

    # -- internals ----------------------------------------------------------------------------
    def _mark(self) -> tuple[list[int], int, int]:
        lengths = [] if self.cache is None else [int(layer.get_seq_length()) for layer in self.cache.layers]
        return lengths, self.length, self.next_position

    def _rewind(self, mark: tuple[list[int], int, int]) -> None:
        lengths, self.length, self.next_position = mark
        for layer, n in zip(self.cache.layers, lengths):  # per layer: MoD layers hold fewer tokens
            extra = int(layer.get_seq_length()) - n
            if extra > 0:
                layer.crop(-extra)  # a negative count removes that many (every transformers 5.x)

    def _mrope_positions(self, ids: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """(3, 1, q) M-RoPE positions of this chunk, continuing the stream."""
        q = ids.shape[1]
        if inputs.get("video_grid_thw") is None and inputs.get("image_grid_thw") is None:
            pos = torch.arange(self.next_position, self.next_position + q, device=ids.device)
            pos = pos.view(1, 1, q).expand(3, 1, q)
        else:
            fn = self.adapter.mm_model.get_rope_index
            names = inspect.signature(fn).parameters
            args = {k: v for k, v in inputs.items() if k in names and k != "attention_mask"}
            pos, _ = fn(ids, **args)
            pos = pos + self.next_position
        self.next_position = int(pos.max()) + 1
        return pos
