"""Writing outputs so that a failure loses nothing: every folder or file is
written beside its destination under a temporary name and renamed into place
only when complete, and the MLX buffer cache is kept small while tensors
stream out one at a time."""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict

from .errors import OutputError, one_line

# Most MLX buffer cache kept while streaming tensors: freed buffers are reused
# for the next tensors (most share a few sizes), and the cache is only
# emptied when it grows past this.
STREAM_CACHE_BYTES = 256 << 20




def release_stream_cache():
    """Empty MLX's buffer cache when it has grown past :data:`STREAM_CACHE_BYTES`."""
    import mlx.core as mx

    if mx.get_cache_memory() > STREAM_CACHE_BYTES:
        mx.clear_cache()


def _occupied(out: Path) -> bool:
    """An existing output (an empty folder does not count)."""
    if out.is_symlink() or out.is_file():
        return True
    return out.is_dir() and any(out.iterdir())


def check_output(out, force: bool, folder: bool):
    """Refuse an existing output (unless ``force``) before any work is done."""
    out = Path(out)
    if _occupied(out) and not force:
        raise OutputError(f"{out}: already exists (force=True replaces it)")
    if out.exists() and out.is_dir() != folder and not out.is_symlink():
        raise OutputError(f"{out}: is a {'file' if folder else 'folder'}, not a "
                          f"{'folder' if folder else 'file'}")


def check_writable(path, param: str):
    """Refuse, before any work, a file that cannot be written: its folder is
    missing, is not a folder, or is not writable, or the path is a folder."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise OutputError(f"{param}={path}: is a folder, not a file", param)
    if not folder.is_dir():
        raise OutputError(f"{param}={path}: the folder {folder} does not exist", param)
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"{param}={path}: not writable", param)


def _make_parents(out: Path) -> list:
    """Create the missing parent folders of ``out``; returns them, outermost first."""
    missing = []
    parent = out.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    made = []
    try:
        for p in reversed(missing):
            p.mkdir()
            made.append(p)
    except OSError as e:
        _remove_parents(made)
        raise OutputError(f"{out}: cannot create the folder {e.filename or out.parent} "
                          f"({e.strerror or one_line(e)})")
    return made


def _remove_parents(made: list):
    for p in reversed(made):
        try:
            p.rmdir()
        except OSError:
            pass


def _replace(tmp: Path, out: Path):
    """Move ``tmp`` to ``out``, replacing what is there."""
    if out.is_dir() and not out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


# staged outputs and scratch folders of this process not yet finished, with the
# parent folders made for them: what an exit that skips the blocks' own cleanup
# removes (see :func:`remove_unfinished`)
_UNFINISHED: Dict[Path, list] = {}


def _discard(tmp: Path, made: list):
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)
    _remove_parents(made)


def remove_unfinished():
    """Remove the staged outputs and scratch folders still open: for a process
    that leaves at once (``os._exit``), whose ``with`` blocks never finish."""
    for tmp, made in list(_UNFINISHED.items()):
        _discard(tmp, made)
        _UNFINISHED.pop(tmp, None)


@contextmanager
def scratch_folder(beside: Path, prefix: str):
    """A temporary folder in ``beside``, removed when the block ends."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=beside))
    _UNFINISHED[tmp] = []
    try:
        yield tmp
    finally:
        _discard(tmp, [])
        _UNFINISHED.pop(tmp, None)


@contextmanager
def _staged(out, force: bool, folder: bool):
    out = Path(out)
    check_output(out, force, folder)
    made = _make_parents(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        if folder:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
    except OSError as e:
        _remove_parents(made)
        raise OutputError(f"{out}: cannot create the output folder ({e.strerror or one_line(e)})")
    _UNFINISHED[tmp] = made
    try:
        yield tmp
        _replace(tmp, out)
    except BaseException:
        _discard(tmp, made)
        raise
    finally:
        _UNFINISHED.pop(tmp, None)


def staged_folder(out, force: bool = False):
    """Yield a fresh folder beside ``out``; rename it to ``out`` when the block
    succeeds (replacing an existing ``out`` only with ``force``), remove it
    when the block fails. Parent folders created here are removed on failure
    too."""
    return _staged(out, force, folder=True)


def staged_file(out, force: bool = False):
    """Yield a temporary path beside ``out``; rename it to ``out`` when the
    block succeeds, remove it (and parent folders created here) when it
    fails."""
    return _staged(out, force, folder=False)
