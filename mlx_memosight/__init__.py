"""MemoSight reasoning on MLX.

``from mlx_memosight import load, generate, stream_generate``: the API is
imported on first use, so that the command-line tools start (and take
Ctrl-C) before MLX is loaded.
"""

import importlib
import os
import signal
import sys
import warnings

# Launched as a command (`python -m mlx_memosight.<cmd>` or a console script),
# Ctrl-C before the command's own handler is in place (while Python imports
# this package and the command) ends the process quietly; the command then
# installs its own (mlx_memosight.cli.run). Imported as a library, nothing
# changes.
_COMMAND_START = bool(sys.argv) and (
    sys.argv[0] == "-m" or os.path.basename(sys.argv[0]).startswith("mlx_memosight"))


def _quiet_interrupt(signum, frame):
    os.write(2, b"\nmlx_memosight: interrupted\n")
    os._exit(130)


if _COMMAND_START and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _quiet_interrupt)

# `python -m mlx_memosight.generate` runs a module this package may already
# have imported for its Python API (as `python -m mlx_lm.generate` does); the
# module keeps no state of its own, so runpy's warning about it is noise.
warnings.filterwarnings(
    "ignore",
    message=r"'mlx_memosight\.\w+' found in sys\.modules after import of package 'mlx_memosight'",
    category=RuntimeWarning,
)

from ._version import __version__  # noqa: E402

# The command module mlx_memosight.generate is light; importing it here, before
# the function of the same name is bound below, keeps `mlx_memosight.generate`
# the API function whatever is imported later (Python binds a submodule to its
# package's attribute only when it first loads it).
from . import generate as _generate_command  # noqa: E402,F401
from .options import DEFAULT_MAX_TOKENS  # noqa: E402


def generate(model, tokenizer, prompt, max_tokens: int = DEFAULT_MAX_TOKENS, verbose: bool = False, **kwargs):
    """Generate a whole answer: :func:`mlx_memosight.generation.generate`."""
    from .generation import generate as run

    return run(model, tokenizer, prompt, max_tokens, verbose, **kwargs)


_API = {
    "load": "loading",
    "load_for_decoding": "loading",
    "stream_generate": "generation",
    "GenerationResponse": "generation",
    "GenerationOptions": "options",
}

__all__ = ["__version__", "generate", *_API]


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
