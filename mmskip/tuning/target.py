"""What the tuner tunes: a declared protocol each kind of model implements once.

A :class:`TuneTarget` wraps the user's object (a causal LM, a diffusers pipeline, a VLM) and
answers the tuner's few questions: which spaces to search (read from the config classes'
declarations), which candidates to always measure (the baseline, fewer steps, peers), how to run
a candidate on inputs, how to score outputs against the baseline's, and how to apply a candidate
for good. Wings register targets for their models with :func:`register_target`; the core names no
wing.
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

from .space import Candidate, Param, Space

if TYPE_CHECKING:
    from ..inject import SkipHandle

__all__ = ["TuneTarget", "ModelTarget", "register_target", "make_target", "UnsupportedTargetError"]

logger = logging.getLogger(__name__)


class UnsupportedTargetError(TypeError):
    """``mmskip.tune`` was given an object no registered target handles."""


class TuneTarget(ABC):
    """The tuner's view of one model. Subclasses implement the abstract methods; the rest have
    defaults that fit a target without sampler settings or peers.

    Attributes:
        kind: ``"lm"``, ``"vlm"``, ``"encoder_decoder"`` or ``"pipeline"``.
        metric: the default quality metric (higher is better), a key of :meth:`quality`'s result.
        default_floor: the floor on ``metric`` when the user gives none.
        model: the wrapped object.
    """

    kind: str = ""
    metric: str = ""
    default_floor: float = 1.0

    def __init__(self, model: Any) -> None:
        self.model = model

    @abstractmethod
    def spaces(self) -> list[Space]:
        """The technique spaces to search (from ``SkipConfig.search_space`` declarations)."""

    def settings_space(self) -> dict[str, Param]:
        """Target settings sampled with every candidate (diffusion: steps, sampler); ``{}``: none."""
        return {}

    def fixed_candidates(self) -> list[Candidate]:
        """Candidates always measured besides the sampled ones (fewer steps, peers); the baseline is
        :meth:`baseline` and is not listed here."""
        return []

    def baseline(self) -> Candidate:
        """The unmodified model at its full setting."""
        return Candidate(family="baseline", label="baseline")

    def default_inputs(self, n: int, offset: int = 0) -> list[Any]:
        """``n`` stock inputs starting at ``offset`` (what ``mmskip tune`` uses when given no inputs;
        disjoint ranges give disjoint calibration and held-out sets)."""
        raise ValueError(f"{type(self).__name__} has no stock inputs; give inputs")

    @abstractmethod
    def check_inputs(self, inputs: Sequence[Any], name: str) -> list[Any]:
        """``inputs`` as the target runs them; raise ``ValueError`` / ``TypeError`` saying what to give."""

    @abstractmethod
    def applied(self, candidate: Candidate) -> AbstractContextManager[Any]:
        """A context in which the model runs ``candidate`` (applied on enter, removed exactly on exit);
        what it yields is what :meth:`forward_cost` reads."""

    def forward_cost(self, applied: Any) -> float | None:
        """The candidate's sequential cost relative to the baseline, read inside :meth:`applied` (given
        what it yielded) after runs, for techniques that save forwards rather than FLOPs (speculative
        decoding); None (default): the tuner ranks the candidate by its FLOPs."""
        return None

    @abstractmethod
    def run(self, inputs: list[Any]) -> Any:
        """Outputs of the model as it is now (inside :meth:`applied`) on ``inputs``, seeded."""

    @abstractmethod
    def quality(self, outputs: Any, reference: Any) -> dict[str, float]:
        """Quality of ``outputs`` against the baseline's ``reference`` (higher is better)."""

    @abstractmethod
    def timing_pair(self, candidate: Candidate, inputs: list[Any]
                    ) -> AbstractContextManager[tuple[Callable[[], Any], Callable[[], Any]]]:
        """A context giving ``(baseline call, candidate call)`` on ``inputs`` for paired timing: both
        usable alternately (e.g. the candidate applied to a copy of the model)."""

    def extra_metrics(self, inputs: list[Any]) -> dict[str, float]:
        """Further held-out numbers for finalists, inside :meth:`applied` (e.g. perplexity)."""
        return {}

    def settings_kwargs(self, candidate: Candidate) -> dict[str, Any]:
        """Call arguments a user passes to run ``candidate`` (e.g. ``num_inference_steps``)."""
        return {}

    def apply(self, candidate: Candidate) -> Any:
        """Apply ``candidate`` for good (what ``TuneResult.apply`` does); returns what removes it."""
        from ..inject import apply

        if len(candidate.configs) != 1:
            raise ValueError(f"{type(self).__name__} applies exactly one config, got {len(candidate.configs)}")
        return apply(self.model, candidate.configs[0])


class ModelTarget(TuneTarget):
    """A target whose candidates are mmskip configs applied to one ``torch.nn.Module`` (language and
    vision-language models): :meth:`applied` applies them with ``mmskip.applied``, :meth:`run` and
    the timing call :meth:`generate` on the model, and :meth:`timing_pair` runs the candidate on a
    deep copy (so it keeps what it learns between calls, as deployed; the model's memory twice)."""

    @abstractmethod
    def generate(self, model: Any, inputs: list[Any]) -> Any:
        """Outputs of ``model`` (the target's model, or a copy with a candidate applied) on ``inputs``."""

    def run(self, inputs: list[Any]) -> Any:
        return self.generate(self.model, inputs)

    @contextmanager
    def applied(self, candidate: Candidate) -> Iterator[list[SkipHandle]]:
        from ..inject import applied

        with ExitStack() as stack:
            yield [stack.enter_context(applied(self.model, config)) for config in candidate.configs]

    def forward_cost(self, applied: list[SkipHandle]) -> float | None:
        """The first applied technique's :meth:`~mmskip.inject.TechniqueState.forward_cost` that has one."""
        costs = [h.state.forward_cost() for h in applied]
        return next((c for c in costs if c is not None), None)

    @contextmanager
    def timing_pair(self, candidate: Candidate, inputs: list[Any]
                    ) -> Iterator[tuple[Callable[[], Any], Callable[[], Any]]]:
        from ..inject import apply

        fast = copy.deepcopy(self.model)
        handles = [apply(fast, c) for c in candidate.configs]
        try:
            yield (lambda: self.generate(self.model, inputs)), (lambda: self.generate(fast, inputs))
        finally:
            for h in reversed(handles):
                h.remove()


_TARGETS: list[tuple[Callable[[Any], bool], Callable[..., TuneTarget]]] = []


def register_target(matches: Callable[[Any], bool], factory: Callable[..., TuneTarget]) -> None:
    """Let ``mmskip.tune`` handle objects for which ``matches(obj)`` is true with ``factory(obj, **options)``
    (newest registration first)."""
    _TARGETS.insert(0, (matches, factory))


def make_target(obj: Any, **options: Any) -> TuneTarget:
    """The registered target for ``obj`` (a :class:`TuneTarget` is returned as is)."""
    if isinstance(obj, TuneTarget):
        return obj
    from ..wings import load_techniques

    _builtin()
    load_techniques()  # the configs declare the spaces; the wings register targets for pipelines and VLMs
    for matches, factory in _TARGETS:
        if matches(obj):
            return factory(obj, **options)
    raise UnsupportedTargetError(
        f"mmskip.tune cannot tune a {type(obj).__name__}: give a causal LM (transformers *ForCausalLM), a diffusers "
        "pipeline, a LLaVA / Qwen2-VL / OneVision model or a Florence-2 model (see docs: tuning)")


def _builtin() -> None:
    if getattr(_builtin, "done", False):
        return
    from .lm import CausalLMTarget, is_causal_lm

    register_target(is_causal_lm, CausalLMTarget)
    _builtin.done = True
