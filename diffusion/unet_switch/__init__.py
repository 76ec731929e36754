"""Multi-UNet switching (A-SDM, https://arxiv.org/abs/2406.00210): the full denoiser on some steps,
a lighter one on the others.

A sampler-level technique (:class:`mmskip.diffusion.plan.SamplerConfig`) that routes rather than
plans: :meth:`UNetSwitchConfig.route` gives a drop-in pipeline one :class:`UNetSwitchRoute` per
call.

* :mod:`.config`: :class:`UNetSwitchConfig` (which light UNet, on which steps);
* :mod:`.state`: :class:`UNetSwitchState`, the steps each network ran in the call;
* :mod:`.hooks`: the switch hook and :class:`UNetSwitchRoute`, which attaches it for one call.
"""

from .config import UNetSwitchConfig
from .hooks import UNetSwitchRoute
from .state import UNetSwitchState

__all__ = ["UNetSwitchConfig", "UNetSwitchRoute", "UNetSwitchState"]
