"""mmskip in vLLM: self-speculative decoding from the served model's own layers
(``SelfSpeculativeProposer``, vLLM's ``custom_class`` drafter) and layer skipping
(``MmskipLlamaForCausalLM``, registered by the ``vllm.general_plugins`` entry point)."""

from .draft_spec import DRAFT_KEY, DraftSpec
from .errors import DraftConfigError, LayerSkipConfigError, MmskipConfigError
from .proposer import SelfSpeculativeProposer

__all__ = ["DRAFT_KEY", "DraftConfigError", "DraftSpec", "LayerSkipConfigError", "MmskipConfigError",
           "SelfSpeculativeProposer"]
