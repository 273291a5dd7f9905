"""The packaged demo model."""

from pathlib import Path

from .config import ConfigError

DEMO_DIR = Path(__file__).parent / "demo_model"


def demo_model_path() -> Path:
    """The folder of the demo model shipped with the package."""
    if not (DEMO_DIR / "config.json").exists():
        raise ConfigError(
            f"no --model given and the demo model is not installed ({DEMO_DIR} is missing); "
            "pass --model PATH"
        )
    return DEMO_DIR
