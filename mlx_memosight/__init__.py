"""MemoSight reasoning on MLX."""

from ._version import __version__
from .generate import GenerationResponse, generate, load, stream_generate

__all__ = ["__version__", "load", "generate", "stream_generate", "GenerationResponse"]
