"""A-SDM's tuning half: model assembly with distillation, ME-CondConv, and (in ``unet_switch``) multi-UNet switching.

Model assembly (Zhu et al., 2024, "A-SDM: Accelerating Stable Diffusion through Model Assembly and
Feature Inheritance Strategies", https://arxiv.org/abs/2406.00210) rebuilds a lighter UNet from a
full one and recovers its quality by distillation:

    from mmskip.diffusion import assembly

    imp = assembly.edit_importance(unet, assembly.sampled_latents(pipe, prompts))  # measured
    edits = assembly.choose_edits(imp, assembly.edit_savings(unet, calibration[0]), speedup=1.25)
    student = assembly.assemble_unet(unet, edits)                  # a plain UNet2DConditionModel
    assembly.insert_condconv(student, num_experts=4)               # optional ME-CondConv
    assembly.distill(student, unet, batches, noise_scheduler)      # output + feature KD
    assembly.save_assembled(student, "out/unet")

``python -m mmskip.diffusion.assembly`` runs the whole recipe on the zoo's ``digits-sd``.

The bypass that measures an edit is a technique (id ``assembly``):
:class:`AssemblyBypassConfig` (:mod:`.config`), :class:`BypassState` (:mod:`.state`), its hook
and ``attach`` (:mod:`.hooks`); :func:`bypassed` applies it for a ``with`` block.
"""

from .condconv import MECondConv2d, condconv_targets, insert_condconv
from .config import AssemblyBypassConfig
from .distill import DistillConfig, distill, shared_features
from .importance import (
    CalibrationBatch,
    bypassed,
    choose_edits,
    edit_importance,
    edit_savings,
    sampled_latents,
)
from .io import load_assembled, save_assembled
from .plan import Edit, assemble_unet, assembled_config, candidate_edits, flops_per_call, parameter_count
from .state import BypassState

__all__ = [
    "Edit",
    "candidate_edits",
    "assembled_config",
    "assemble_unet",
    "parameter_count",
    "flops_per_call",
    "CalibrationBatch",
    "bypassed",
    "AssemblyBypassConfig",
    "BypassState",
    "edit_importance",
    "edit_savings",
    "sampled_latents",
    "choose_edits",
    "MECondConv2d",
    "insert_condconv",
    "condconv_targets",
    "DistillConfig",
    "distill",
    "shared_features",
    "save_assembled",
    "load_assembled",
]
