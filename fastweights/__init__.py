"""fastweights: fast weights and test-time training for language models.

Importing the package registers the In-Place TTT model types (``inplace_ttt_<family>``) with
the transformers Auto classes, so that ``AutoModelForCausalLM.from_pretrained`` loads
converted checkpoints.
"""

from fastweights.models import convert, is_converted, load_pretrained, ttt_parameters
from fastweights.ops import inplace_ttt

__version__ = "0.1.0"
__all__ = ["convert", "inplace_ttt", "is_converted", "load_pretrained", "ttt_parameters"]
