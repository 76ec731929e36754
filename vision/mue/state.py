"""What an applied MuE config remembers: the encoder pass and decoder forward in flight (shared by
the layer hooks), the last encoder pass's exits per token, the current generation's exit layer per
(row, position), and the pins that replay them."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mmskip._graph_callback import Keyed, effectful_op
from mmskip.inject import CallGuard, TechniqueState

from ..adapters import EncDecVLMAdapter
from ..generation_replay import Generations

if TYPE_CHECKING:
    from .config import MuEConfig

__all__ = ["MuEState", "EncoderRecord", "EncoderPass", "DecoderPass", "NEVER", "or_never", "cosine", "guarded",
           "decoder_done"]

logger = logging.getLogger("mmskip.vision.mue")

NEVER = 2.0  # a threshold the clamped cosine (<= 1) can never exceed


def or_never(value: float | None) -> float:
    """A threshold as a float: ``None`` (no exits there) becomes :data:`NEVER`."""
    return NEVER if value is None else float(value)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last dim in float32, clamped to [-1, 1]: the exit signal."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8).clamp(-1.0, 1.0)


def one_token_exits(a: torch.Tensor, b: torch.Tensor, threshold: float) -> bool:
    """``cosine(a, b) > threshold`` for one token, with two tensor ops and one host read (the two
    vectors' Gram matrix) instead of the dozen small ops of :func:`cosine` and its comparison."""
    v = torch.stack([a.reshape(-1), b.reshape(-1)]).float()
    (aa, ab), (_, bb) = (v @ v.T).tolist()
    cos = ab / max(math.sqrt(aa * bb), 1e-8)
    return min(max(cos, -1.0), 1.0) > threshold


def guarded(guard: CallGuard, starts: bool) -> contextlib.AbstractContextManager:
    """``guard.call(starts)`` eagerly; nothing inside a ``torch.compile`` trace, where a thread id and
    a lock cannot be traced (a compiled caller does not get the concurrent-use check)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else guard.call(starts=starts)


@dataclass
class EncoderPass:
    """One encoder call: which tokens are image / padding, who has exited and after which layer."""

    layers: int
    image: torch.Tensor  # (B, N) bool
    valid: torch.Tensor  # (B, N) bool
    done: torch.Tensor  # (B, N) bool: exited (real tokens only)
    exit_layer: torch.Tensor  # (B, N) long: layers run (``layers`` until exit; 0 at padding)
    thr: torch.Tensor  # (B, N) float: each token's threshold
    measure: bool  # any threshold can trigger
    pinned: torch.Tensor | None = None  # (B, N) long: exit layers to replay


@dataclass
class EncoderRecord:
    """The last encoder pass: where the image tokens and padding were and how many layers each
    token ran (its 1-based exit layer; the encoder depth = never exited; 0 at padding)."""

    image: torch.Tensor  # (batch, seq) bool
    valid: torch.Tensor  # (batch, seq) bool: not padding
    exit_layer: torch.Tensor  # (batch, seq) long


@dataclass
class DecoderPass:
    """One decoder forward: positions ``past .. past + q - 1`` of ``batch`` rows."""

    layers: int
    batch: int
    q: int
    past: int
    done: torch.Tensor  # (B, q) bool
    exit_layer: torch.Tensor  # (B, q) long
    thr: torch.Tensor  # (q,) float: the threshold at each position
    measure: bool
    pinned: torch.Tensor | None = None  # (B, q) long: exit layers to replay, -1 = measure
    measure_from: int = 0  # positions before this one replay ``pinned``; from here on they are measured
    dense: int = 0  # exited (layer, token) pairs computed anyway (mixed batch)
    single: bool = False  # one token, nothing pinned: the layers keep ``exit_at`` instead of the masks
    single_thr: float = NEVER  # single: the token's threshold, as a Python float
    exit_at: int = 0  # single: the layer the token exited after (0: still running)

    def settle(self) -> None:
        """After the forward: a single token's ``exit_at`` written into ``done`` / ``exit_layer``."""
        if self.single and self.exit_at:
            self.done.fill_(True)
            self.exit_layer.fill_(self.exit_at)


@dataclass
class MuEState(Keyed, TechniqueState):
    """What an applied :class:`MuEConfig` remembers: the last encoder pass's exits per token, the
    current decoder generation's exit layer per (row, position), the pins that replay them, and
    the per-call passes the hooks share. ``stats()`` describes the last encoder pass and the last
    decoder generation (since its cache was empty); ``handle.stats()['items']`` and
    ``flops_fraction`` accumulate over every call until ``handle.reset_stats()``."""

    config: MuEConfig
    adapter: EncDecVLMAdapter
    min_layers: int
    encoder_record: EncoderRecord | None = None
    _exits: torch.Tensor | None = None  # decoder_exits, when held as a tensor
    # decoder_exits when no token could exit (a config whose thresholds never trigger): (rows, positions,
    # device), every entry the decoder depth; the tensor is built when read, not per decoder step
    never_exited: tuple[int, int, torch.device] | None = None
    decoder_dense: int = 0  # exited (layer, token) pairs a mixed batch still computed, this generation
    decoder_complete: bool = True  # False: a forward continued a cache whose history was not recorded
    pinned_encoder: torch.Tensor | None = None
    pinned_decoder: torch.Tensor | None = None
    enc: EncoderPass | None = None  # the encoder pass in flight
    dec: DecoderPass | None = None  # the decoder forward in flight
    pending: dict[int, torch.Tensor] = field(default_factory=dict)  # thread -> image mask awaiting its encoder
    generations: Generations = field(default_factory=Generations)  # generate calls in flight, per thread
    warned_no_image: bool = False
    thr_table: torch.Tensor | None = None  # the decoder threshold at positions 0..n-1 (float32, CPU)
    thr_values: list[float] = field(default_factory=list)  # the same table as Python floats (one-token steps)
    first_exit: int = 0  # the first decoder position whose threshold is below 1 (table length: none)
    key: int = -1  # how a compiled graph's ``mmskip::mue_decoder_done`` finds this state

    def __post_init__(self) -> None:
        self.register_key()

    @property
    def decoder_exits(self) -> torch.Tensor | None:
        """(batch, positions) long: the layers each decoder token of the current generation ran."""
        if self.never_exited is not None:
            rows, n, dev = self.never_exited
            self._exits = torch.full((rows, n), self.adapter.num_decoder_layers, dtype=torch.long, device=dev)
            self.never_exited = None
        return self._exits

    @decoder_exits.setter
    def decoder_exits(self, value: torch.Tensor | None) -> None:
        self._exits, self.never_exited = value, None

    def decoder_shape(self) -> tuple[int, int] | None:
        """``decoder_exits``' (rows, positions), without building it."""
        if self.never_exited is not None:
            return self.never_exited[:2]
        return None if self._exits is None else (int(self._exits.shape[0]), int(self._exits.shape[1]))

    def reset(self) -> None:
        """Forget the last encoder pass and decoder generation, and any pins; counts stay."""
        self.encoder_record = self.decoder_exits = None
        self.decoder_dense, self.decoder_complete = 0, True
        self.pinned_encoder = self.pinned_decoder = None
        self.enc = self.dec = None
        self.pending.clear()

    # -- capture from the hooks -----------------------------------------------------------
    def capture_image_mask(self, mask: torch.Tensor) -> None:
        """Called by the wrapped ``get_placeholder_mask``: the next encoder call on this thread
        gets this (batch, seq) image-token mask."""
        self.pending[threading.get_ident()] = (mask[..., 0] if mask.dim() == 3 else mask).bool()

    def take_image_mask(self) -> torch.Tensor | None:
        return self.pending.pop(threading.get_ident(), None)

    def decoder_thresholds(self, past: int, q: int, device: torch.device) -> tuple[torch.Tensor, bool]:
        """The exit thresholds at decoder positions ``past .. past + q - 1`` and whether any can trigger.

        Read from a table of ``config.decoder_threshold_at`` computed once in Python (grown when a
        generation runs past it), so a compiled decoder step indexes a tensor by position instead of
        specializing on each position's float. The thresholds never rise with the position (decay
        <= 1, then the floor), so some threshold in the range is below 1 iff the last one is."""
        if self.thr_table is None or self.thr_table.numel() < past + q:
            n = max(past + q, 512, 2 * (0 if self.thr_table is None else self.thr_table.numel()))
            values = [or_never(self.config.decoder_threshold_at(t)) for t in range(n)]
            self.thr_table = torch.tensor(values)
            self.thr_values = self.thr_table.tolist()  # float32-rounded, as the masked path compares
            self.first_exit = next((t for t, v in enumerate(values) if v < 1.0), n)
        return self.thr_table[past: past + q].to(device), past + q - 1 >= self.first_exit

    # -- what a decoder forward leaves ---------------------------------------------------------
    def record_pass(self, exit_layer: torch.Tensor, past: int, dense: int) -> None:
        """A measured decoder forward over positions ``past ..``: its (B, q) exit layers joined to the
        generation's (a forward that continues a cache this state did not see makes it incomplete)."""
        if past == 0:
            self.decoder_exits, self.decoder_dense, self.decoder_complete = exit_layer, dense, True
            return
        prev = self.decoder_exits
        self.decoder_dense += dense
        if prev is not None and self.decoder_complete and tuple(prev.shape) == (exit_layer.shape[0], past):
            self.decoder_exits = torch.cat([prev, exit_layer.to(prev.device)], dim=1)
        else:
            self.decoder_exits, self.decoder_complete = exit_layer, False

    def record_counted(self, rows: int, past: int, q: int, device: torch.device) -> None:
        """A decoder forward no exit could trigger in: every entry of its exits is the depth, kept as
        a shape (:attr:`never_exited`) instead of a tensor per step."""
        if past == 0:
            self.decoder_dense, self.decoder_complete = 0, True
        elif not (self.decoder_complete and self.decoder_shape() == (rows, past)):
            self.decoder_complete, past = False, 0  # as record_pass: only this forward's exits are known
        self.decoder_exits = None
        self.never_exited = (rows, past + q, device)

    # -- exit replay -------------------------------------------------------------------------
    def pin_exits(self) -> None:
        """Make later calls reuse the recorded exits instead of measuring: the encoder replays the
        last encoder pass's exit layer per token, the decoder the last generation's exit layer per
        (row, position) (e.g. to recompute a generation without a cache under the same decisions).
        ``unpin_exits()`` undoes it."""
        if self.encoder_record is None and self.decoder_exits is None:
            raise RuntimeError("MuEState.pin_exits(): nothing recorded yet; run the model first")
        if not self.decoder_complete:
            raise RuntimeError(
                "MuEState.pin_exits(): the last decoder generation continued a cache this application did not see "
                "from its start, so its exits are not all recorded"
            )
        self.pinned_encoder = None if self.encoder_record is None else self.encoder_record.exit_layer.clone()
        self.pinned_decoder = None if self.decoder_exits is None else self.decoder_exits.clone()

    def unpin_exits(self) -> None:
        self.pinned_encoder = self.pinned_decoder = None

    # -- statistics -----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        c = self.config
        Le, Ld = self.adapter.num_encoder_layers, self.adapter.num_decoder_layers
        encoder: dict[str, Any] = {"layers": Le, "granularity": c.encoder_granularity,
                                   "thresholds": {m: c.encoder_threshold(m) for m in ("image", "text")}}
        rec = self.encoder_record
        for name in ("image", "text"):
            if rec is None:
                tokens, run = 0, 0
            else:
                sel = rec.valid & (rec.image if name == "image" else ~rec.image)
                tokens, run = int(sel.sum()), int(rec.exit_layer[sel].sum())
            encoder[name] = _tally(tokens, run, Le)
        if self.never_exited is not None:  # every token ran every layer
            tokens = self.never_exited[0] * self.never_exited[1]
            run = tokens * Ld
        else:
            ex = self.decoder_exits
            tokens, run = (0, 0) if ex is None else (ex.numel(), int(ex.sum()))
        decoder = {"layers": Ld, "min_layers": self.min_layers, **_tally(tokens, run, Ld),
                   "computed_anyway": self.decoder_dense, "complete": self.decoder_complete,
                   **c.decoder_params()}
        return {"encoder": encoder, "decoder": decoder,
                "pinned": self.pinned_encoder is not None or self.pinned_decoder is not None}


def _decoder_done(t: torch.Tensor, key: int, past: int, dense: int, measured: bool) -> None:
    """``mmskip::mue_decoder_done``: the end of a decoder forward, handed from a compiled graph to
    :meth:`MuEState.record_pass` / :meth:`MuEState.record_counted` when the graph runs. Recording
    inside the graph would make the generation's length (Python state that changes every step) a
    guard: a recompile per decoder step until dynamo's recompile limit sends the forward to eager."""
    st = Keyed.find(key)
    if st is None:
        return
    if measured:  # a copy: a compiled graph may reuse its buffers once this op returns
        st.record_pass(t.clone(), past, dense)
    else:
        st.record_counted(int(t.shape[0]), past, int(t.shape[1]), t.device)


_DONE_OP = effectful_op("mmskip::mue_decoder_done", _decoder_done, lambda t, key, past, dense, measured: None)


def decoder_done(st: MuEState, t: torch.Tensor, past: int, dense: int, measured: bool) -> None:
    """Record a decoder forward: ``t`` is its (B, q) exit layers (``measured``) or its input (B, q[, D]).
    In a compiled graph through ``mmskip::mue_decoder_done``, which runs when the graph runs."""
    if _DONE_OP is not None and torch.compiler.is_compiling():
        _DONE_OP(t.detach(), st.key, past, dense, measured)
    elif measured:
        st.record_pass(t, past, dense)
    else:
        st.record_counted(int(t.shape[0]), past, int(t.shape[1]), t.device)


def _tally(tokens: int, run: int, layers: int) -> dict[str, Any]:
    """Layer-token computations as the paper counts them: every exited token skips the rest."""
    return {"tokens": tokens, "layer_tokens": tokens * layers, "run": run, "skipped": tokens * layers - run,
            "mean_exit_layer": run / tokens if tokens else None}
