"""The project's error type and how an error becomes one line.

Every problem with the user's input (a file, a field, a parameter) is a
:class:`MemoSightError` (or a subclass named after the module that raises it).
Library code names parameters by their Python names: ``param`` marks the
parameter a message is about (the message starts with it), and advice is
written as ``name=value``. Only the commands (:mod:`mlx_memosight.cli`) speak
of flags; they rewrite both forms into the flags of their own parser.
"""

from typing import Optional


class MemoSightError(ValueError):
    """Bad input, phrased for the user: one line naming the file, field or
    parameter at fault.

    Args:
        message: the message; when ``param`` is given it starts with it
            (``"draft_len must be between 0 and 16, got 20"``).
        param: the parameter the message is about, if any.
    """

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


def one_line(e: BaseException) -> str:
    """An exception's text on one line (its type name when it has none)."""
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


# One error type per part of the project, so that callers can tell them apart;
# the commands treat them all alike.


class ConfigError(MemoSightError):
    """A model folder, ``config.json`` or ``memosight.json`` problem."""


class OptionError(MemoSightError):
    """A parameter outside its choices or limits (``param`` names it)."""


class OutputError(MemoSightError):
    """An output that cannot be written, naming it."""


class GenerationError(MemoSightError):
    """Bad generation input."""


class ConvertError(MemoSightError):
    """A checkpoint that cannot be converted, naming the file, field or parameter."""


class GGUFError(ConfigError):
    """A GGUF problem, naming the file, key, tensor or parameter."""


class DataError(MemoSightError):
    """A training-data problem, naming the file and line."""


class TrainError(MemoSightError):
    """A training problem, naming the file or parameter."""


class EvaluateError(MemoSightError):
    """A problem with an evaluation's files or settings."""
