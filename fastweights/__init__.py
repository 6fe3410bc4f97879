"""fastweights: fast weights and test-time training for language models.

Importing the package registers its model types with the transformers Auto classes (the
In-Place TTT ``inplace_ttt_<family>``, the FWL ``fwl_<family>`` and the hybrid
``fastweights_hybrid``), so that ``AutoModelForCausalLM.from_pretrained`` loads their checkpoints.
"""

from fastweights.models import convert, is_converted, load_pretrained, ttt_parameters
from fastweights.models import hybrid as _hybrid  # noqa: F401  (registers fastweights_hybrid)
from fastweights.ops import inplace_ttt

__version__ = "0.1.0"
__all__ = ["convert", "inplace_ttt", "is_converted", "load_pretrained", "ttt_parameters"]
