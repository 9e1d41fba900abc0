"""rnndrop: dropout for recurrent networks.

``rnndrop.nn``, ``rnndrop.functional`` and ``rnndrop.config`` need only torch; the
training layer (``rnndrop.lit``) and the studies need Lightning.
"""

from .config import RecurrentDropout

__version__ = "0.1.0"
__all__ = ["RecurrentDropout", "__version__"]
