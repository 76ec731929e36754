"""The diffusion wing's model facts: where a denoiser's blocks, layers and units are, and how a
residual module's stream is read and rebuilt.

* :mod:`.denoisers`: the ``kind="diffusion"`` adapters registered in :mod:`mmskip.registry`
  (UNets by name, diffusion transformers through diffusers' ``TransformerBlockRegistry``);
* :mod:`.block_registry`: block I/O read from diffusers' ``TransformerBlockRegistry``;
* :mod:`.residual_io`: :class:`ResidualIO`, shared by feature inheritance, RelaCtrl's control
  skipping and assembly's bypass.

Importing this package registers the adapters.
"""

from .block_registry import registered_block_classes, registry_io
from .denoisers import GRANULARITIES, DiffusionAdapter, registry_families
from .residual_io import ResidualIO, arg_getter

__all__ = [
    "DiffusionAdapter",
    "ResidualIO",
    "GRANULARITIES",
    "registry_families",
    "registered_block_classes",
    "registry_io",
    "arg_getter",
]
