"""``mmskip.tune``: search the techniques' declared fields (and a pipeline's steps and sampler) for
the fastest setting that keeps a quality floor, measured on the user's model, inputs and device.

    result = mmskip.tune(model, prompts, floor=0.9, budget="5m", tokenizer=tok)
    print(result.table()); result.plot("front.png"); result.save("tuned/")
    handle = result.apply(model)
"""

from .result import Measured, TuneResult
from .search import TuneError, parse_budget
from .space import Candidate, Choice, FloatRange, IntRange, Space, TuneContext
from .target import TuneTarget, UnsupportedTargetError, make_target, register_target
from .tune import tune

__all__ = ["tune", "TuneResult", "Measured", "TuneError", "parse_budget", "Candidate", "Choice", "IntRange",
           "FloatRange", "Space", "TuneContext", "TuneTarget", "UnsupportedTargetError", "make_target",
           "register_target"]
