"""MemoSight reasoning on MLX."""

from ._version import __version__
from .model import load

__all__ = ["__version__", "load"]
