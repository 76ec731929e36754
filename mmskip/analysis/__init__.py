"""Analysis tools: where a model's depth goes and what can be skipped."""

from .depth import DepthReport, depth_report, skip_curve, skip_effects, sublayer_contributions
from .host_reads import HostReads
from .voids import VoidReport, void_layers

__all__ = [
    "HostReads",
    "VoidReport",
    "void_layers",
    "DepthReport",
    "depth_report",
    "sublayer_contributions",
    "skip_effects",
    "skip_curve",
]
