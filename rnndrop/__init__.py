"""rnndrop: dropout for recurrent networks.

``rnndrop.nn``, ``rnndrop.functional``, ``rnndrop.config`` and ``rnndrop.runtime`` need only
torch; the training layer (``rnndrop.lit``) and the studies need Lightning.
"""

from .config import RecurrentDropout
from .runtime import flush_subnormals, set_flush_subnormals

__version__ = "0.1.0"
__all__ = ["RecurrentDropout", "__version__", "flush_subnormals", "set_flush_subnormals"]
