import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The drafting policy keeps measured pass costs in the user's cache folder;
# the tests keep theirs apart (subprocesses inherit it).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="memosight-test-cache-")

SHARED = Path(os.environ.get("MEMOSIGHT_SHARED", ROOT.parent / "shared"))


def shared_path(*parts) -> Path:
    """A path under ../shared, or skip the test with the reason."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent: this test needs ../shared beside the repository")
    return p


@pytest.fixture
def qwen2_tokenizer_path():
    return shared_path("tokenizers", "qwen2")


@pytest.fixture
def llama3_tokenizer_path():
    return shared_path("tokenizers", "llama3")


@pytest.fixture(scope="session", params=["qwen2", "llama"])
def reasoner(request):
    """A tiny MemoSight model of each family trained to emit splitters
    (``tests/data``, made by ``python tests/helpers.py``): ``(path, task)``."""
    from helpers import shipped_reasoner

    return shipped_reasoner(request.param)
