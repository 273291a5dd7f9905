"""Loading: an MLX model folder or a ``.gguf`` file to model, tokenizer and
MemoSight configuration, in one place that every command uses.

* :func:`load` is the Python API (``model, tokenizer = load(path)``, as
  mlx-lm's), with the MemoSight configuration on ``model.memosight_config``;
* :func:`load_folder` returns everything a folder holds (used by training,
  fusing and the GGUF export);
* :func:`read_hf_config` / :func:`normalize_hf_config` read a Hugging Face
  ``config.json`` the way mlx-lm needs it.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .config import CONFIG_FILE, SUPPORTED_FAMILIES, ConfigError, MemoSightConfig, read_json
from .errors import one_line


@dataclass
class ModelFolder:
    """What a model folder holds: the model (MemoSight-ready), mlx-lm's
    tokenizer wrapper, the normalised ``config.json`` and ``memosight.json``
    (None for a plain model)."""

    path: Path
    model: object
    tokenizer: object
    config: dict
    memosight: Optional[MemoSightConfig]

    @property
    def hf_tokenizer(self):
        return unwrap_tokenizer(self.tokenizer)


def normalize_hf_config(config: dict) -> dict:
    """Bring a Hugging Face ``config.json`` into the shape mlx-lm reads.

    transformers 5 writes ``rope_theta`` and the scaling settings under
    ``rope_parameters``; mlx-lm only reads the top-level keys and silently
    falls back to its defaults otherwise.
    """
    config = dict(config)
    rp = config.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        config.setdefault("rope_theta", rp["rope_theta"])
        rope_type = rp.get("rope_type", rp.get("type", "default"))
        if rope_type != "default" and not config.get("rope_scaling"):
            config["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    return config


def read_hf_config(model_path) -> dict:
    """A folder's ``config.json`` as written, checked to be a supported family."""
    path = Path(model_path) / "config.json"
    config = read_json(path)
    if config.get("model_type") not in SUPPORTED_FAMILIES:
        raise ConfigError(f"{path}: model_type {config.get('model_type')!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_FAMILIES)})"[:300])
    return config


def check_weight_files(files) -> None:
    """Every safetensors file's header must be whole and describe data that
    the file holds (MLX's reader gives a bare RuntimeError otherwise)."""
    from safetensors import safe_open

    for f in files:
        readable(f, ConfigError)
        try:
            with safe_open(str(f), framework="numpy") as st:
                list(st.keys())
        except Exception as e:  # safetensors raises its own error types
            raise ConfigError(f"{f}: not a complete safetensors file ({one_line(e)})")


def readable(path: Path, error=ConfigError):
    """Refuse a file that cannot be opened, saying why (the readers of
    safetensors and GGUF files would report it as a damaged file)."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})")


def _existing(path: Path) -> Path:
    if not path.exists():
        if path.is_symlink():
            raise ConfigError(f"{path}: a symbolic link that leads nowhere (or in a loop)")
        raise ConfigError(f"{path}: no such file or folder")
    return path


def load_model(model_path, lazy: bool = False):
    """The weights of an mlx-lm model folder, MemoSight-ready.

    Returns:
        ``(model, config)`` where ``config`` is the normalised ``config.json``.
    """
    from mlx_lm.utils import load_model as mlx_load_model

    from .model import attach_token_rope

    model_path = _existing(Path(model_path))
    if not model_path.is_dir():
        raise ConfigError(f"{model_path}: not a model folder")
    config = normalize_hf_config(read_hf_config(model_path))
    files = sorted(model_path.glob("model*.safetensors"))
    if not files:
        raise ConfigError(f"{model_path}: no model*.safetensors weights (is it a Hugging Face "
                          "checkpoint? convert it with mlx_memosight.convert)")
    check_weight_files(files)
    overrides = {k: config[k] for k in ("rope_theta", "rope_scaling") if k in config}
    try:
        model, loaded = mlx_load_model(model_path, lazy=lazy, model_config=overrides)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError, KeyError) as e:
        # mlx-lm lists every parameter at fault; the first line says what is wrong
        raise ConfigError(f"{model_path}: mlx-lm cannot load the model "
                          f"({(str(e).strip() or type(e).__name__).splitlines()[0]})"[:400])
    attach_token_rope(model)
    return model, normalize_hf_config(loaded)


def _check_tokenizer_files(path: Path):
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ConfigError(
            f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); "
            "save the tokenizer beside the model with tokenizer.save_pretrained"
        )


def hf_tokenizer(path):
    """The Hugging Face tokenizer saved in a folder, with its added tokens."""
    from transformers import AutoTokenizer

    path = Path(path)
    _check_tokenizer_files(path)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for broken files
        raise ConfigError(f"{path}: cannot load the tokenizer ({one_line(e)})")


def unwrap_tokenizer(tokenizer):
    """The Hugging Face tokenizer inside mlx-lm's wrapper (or the tokenizer
    itself: a fast Hugging Face tokenizer has a ``_tokenizer`` too, the Rust
    one inside it)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer


def load_folder(path, lazy: bool = False) -> ModelFolder:
    """Load an MLX model folder: model, tokenizer, ``config.json`` and
    ``memosight.json``.

    Args:
        lazy: leave the weights unread until used (the GGUF export streams
            them one at a time).

    Raises:
        ConfigError: naming the file at fault.
    """
    from mlx_lm.utils import load_tokenizer

    path = Path(path)
    model, config = load_model(path, lazy=lazy)
    _check_tokenizer_files(path)
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:  # transformers raises many types for broken files
        raise ConfigError(f"{path}: cannot load the tokenizer ({one_line(e)})"[:400])
    memosight = MemoSightConfig.load(path)
    if memosight is not None:
        vocab = model.args.vocab_size
        ids = memosight.token_ids
        if max(ids.memory + [ids.splitter, ids.continue_, ids.foresight, ids.eos]) >= vocab:
            raise ConfigError(f"{path / CONFIG_FILE}: token_ids name ids beyond the model's "
                              f"vocabulary of {vocab}")
    return ModelFolder(path, model, tokenizer, config, memosight)


def is_mlx_folder(path) -> bool:
    """An mlx-lm model folder (weights written by MLX, or a quantised
    ``config.json``) rather than a Hugging Face checkpoint."""
    from safetensors import safe_open

    path = Path(path)
    try:
        cfg = read_json(path / "config.json")
    except ConfigError:
        return False
    if "quantization" in cfg:
        return True
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        return False
    try:
        with safe_open(str(files[0]), framework="numpy") as f:
            return (f.metadata() or {}).get("format") == "mlx"
    except Exception:  # safetensors raises its own error types for broken headers
        return False


def resolve_model(path) -> Path:
    """``path``, the packaged demo model when it is None, or a packaged model
    by name (``demo``, ``long-demo``) when no file or folder has that name."""
    from .demo import PACKAGED, demo_model_path, packaged_model_path

    if path is None:
        return demo_model_path()
    if str(path) in PACKAGED and not Path(path).exists():
        return packaged_model_path(str(path))
    return Path(path)


def load(path, lazy: bool = False, adapter_path=None):
    """Load a MemoSight (or plain) model folder or GGUF file.

    Args:
        adapter_path: MemoSight adapters (``mlx_memosight.lora``) to load into
            the model, as ``mlx_lm.load`` does; the model may be the plain
            base they were trained from.

    Returns:
        ``(model, tokenizer)`` as mlx-lm does; the MemoSight configuration is
        ``model.memosight_config`` (None for a plain model, which then runs
        plain decoding).
    """
    path = _existing(Path(path))
    if path.is_file():
        if adapter_path is not None:
            raise ConfigError(f"adapter_path={adapter_path}: adapters load into a model folder, not "
                              "a GGUF file", "adapter_path")
        from .gguf import load_gguf

        model, tokenizer, cfg = load_gguf(path)
    else:
        folder = load_folder(path, lazy=lazy)
        model, tokenizer, cfg = folder.model, folder.tokenizer, folder.memosight
        if adapter_path is not None:
            from .train import apply_adapters

            cfg = apply_adapters(model, tokenizer, adapter_path, path)
    model.memosight_config = cfg
    return model, tokenizer


def load_for_decoding(path, adapter_path=None, log: Callable[[str], None] = None):
    """:func:`load`, then what decoding on this machine needs: on MLX's CPU
    backend a quantized model with half-precision scales computes in float32
    (:func:`mlx_memosight.backend.float32_on_cpu`; many times faster there),
    and any other slow choice of weights is named. What was done or noticed
    goes to ``log`` (default: a ``notice:`` line on stderr)."""
    from .backend import cpu_dtype_advice, float32_on_cpu, model_dtype

    if log is None:
        def log(text):
            print(f"notice: {path}: {text}", file=sys.stderr)
    model, tokenizer = load(path, adapter_path=adapter_path)
    note = float32_on_cpu(model) or cpu_dtype_advice(*model_dtype(model))
    if note:
        log(note)
    return model, tokenizer


def memosight_notice(path) -> Optional[str]:
    """What to tell a user whose model has no MemoSight configuration."""
    path = Path(path)
    what = "memosight.* metadata" if path.is_file() else CONFIG_FILE
    return f"notice: {path} has no {what}; running plain decoding"
