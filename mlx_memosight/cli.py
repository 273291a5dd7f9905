"""How every command runs and reports.

:func:`run` parses the arguments and runs a command's body with one
convention for all commands: bad input prints ``PROG: error: MESSAGE`` (one
line, no traceback) and exits with 1; Ctrl-C prints ``PROG: interrupted``
(and what was kept, when the interrupted code says so by raising
``KeyboardInterrupt(message)``) and exits with 130, from the first moment on. Library
errors name parameters (:mod:`mlx_memosight.errors`); here they are rewritten
into the command's own flags. This module imports nothing heavy, so a command
reaches its ``try`` before MLX is loaded.
"""

import argparse
import functools
import os
import re
import signal
import sys
from typing import Callable, Dict, Optional, Tuple

from .errors import MemoSightError, one_line


class UsageError(MemoSightError):
    """A command line that asks for nothing or for contradictory things."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error line and exit status."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(1)


def _flags(parser: argparse.ArgumentParser) -> Dict[str, Tuple[str, argparse.Action]]:
    out = {}
    for a in parser._actions:
        if a.option_strings and a.dest not in out:
            long = [s for s in a.option_strings if s.startswith("--")]
            out[a.dest] = ((long or a.option_strings)[0], a)
    return out


# --model's help wherever a command loads one model
MODEL_HELP = ("MLX model folder or .gguf file (default: the packaged demo model; long-demo: the packaged "
              "long-reasoning model)")

_ASSIGNMENT = re.compile(r"(?<![\w.-])([a-z_][a-z0-9_]*)=([^\s,;:)]+)")


def flag_message(e: BaseException, parser: Optional[argparse.ArgumentParser]) -> str:
    """The error's one-line text with parameter names turned into ``parser``'s
    flags: a leading ``param`` (the error's subject) becomes its flag, and
    ``name=value`` advice becomes ``--name value`` (``--name`` for a switch)."""
    message = one_line(e)
    if parser is None:
        return message
    flags = _flags(parser)
    param = getattr(e, "param", None)
    if param in flags and message.startswith(param) and message[len(param):][:1] != "=":
        message = flags[param][0] + message[len(param):]

    def flag(m):
        name, value = m.group(1), m.group(2)
        if name not in flags:
            return m.group(0)
        text, action = flags[name]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            on = isinstance(action, argparse._StoreTrueAction) == (value == "True")
            return text if on else f"no {text}"
        return f"{text} {value}"

    return _ASSIGNMENT.sub(flag, message)


def _in_import(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _interrupt(prog, signum, frame):
    """Python's Ctrl-C, except while a module is being imported: extension
    modules (torch's, which transformers imports when it is installed) run
    Python code from C++ as they load, and a KeyboardInterrupt raised there can
    abort the process (``terminate called after throwing ...``) instead of
    reaching the command. There the process leaves at once, after removing
    the unfinished outputs the ``with`` blocks it skips would have removed."""
    if _in_import(frame):
        outputs = sys.modules.get("mlx_memosight.outputs")
        if outputs is not None:
            outputs.remove_unfinished()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a flush the signal interrupted
                pass
        os.write(2, f"\n{prog}: interrupted\n".encode())
        os._exit(130)
    raise KeyboardInterrupt


def _exit_interrupted():
    """Exit with 130. A process launched as a command leaves at once: Python
    marks an interrupt that struck code run by ``exec`` (dataclasses and
    namedtuples are made that way while modules import) as unhandled and
    would end the process by SIGINT, whatever the handler did."""
    if getattr(sys.modules.get("mlx_memosight"), "_COMMAND_START", False):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(130)


def run(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], Optional[int]],
        argv=None, defaults: Optional[Callable] = None) -> None:
    """Parse ``argv`` and run ``body(args)`` under the error convention.

    ``body`` imports what it needs itself, so that Ctrl-C during the imports
    is caught too. ``defaults(parser, argv)``, when given, may set the
    parser's defaults first (from a config file). Exits with ``body``'s
    return value when it is an int.
    """
    prog = parser.prog
    # the package's start-up handler (if any) gives way to one raising
    # KeyboardInterrupt, which the except clause below turns into exit 130
    if getattr(signal.getsignal(signal.SIGINT), "__name__", "") == "_quiet_interrupt":
        signal.signal(signal.SIGINT, functools.partial(_interrupt, prog))
    try:
        if defaults is not None:
            defaults(parser, argv)
        args = parser.parse_args(argv)
        code = body(args)
    except KeyboardInterrupt as e:
        # a KeyboardInterrupt raised again with a message says what was kept
        kept = str(e)
        print(f"\n{prog}: interrupted" + (f"; {kept}" if kept else ""), file=sys.stderr)
        _exit_interrupted()
    except MemoSightError as e:
        print(f"{prog}: error: {flag_message(e, parser)}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or one_line(e)}", file=sys.stderr)
        sys.exit(1)
    if isinstance(code, int) and code:
        sys.exit(code)
