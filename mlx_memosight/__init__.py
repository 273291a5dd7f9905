"""MemoSight reasoning on MLX."""

import warnings

# `python -m mlx_memosight.generate` runs a module this package has already
# imported for its Python API (as `python -m mlx_lm.generate` does); the
# module keeps no state of its own, so runpy's warning about it is noise.
warnings.filterwarnings(
    "ignore",
    message=r"'mlx_memosight\.\w+' found in sys\.modules after import of package 'mlx_memosight'",
    category=RuntimeWarning,
)

from ._version import __version__  # noqa: E402
from .generate import GenerationResponse, generate, load, stream_generate  # noqa: E402

__all__ = ["__version__", "load", "generate", "stream_generate", "GenerationResponse"]
