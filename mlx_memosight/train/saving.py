"""Saving a standalone MemoSight model folder, and fusing trained adapters into
their base model."""

import shutil
from pathlib import Path
from typing import Optional

from ..config import CHECKPOINT_EXTRA_KEYS, MemoSightConfig, write_model_card
from ..errors import TrainError
from ..errors import ConfigError
from ..loading import check_weight_files, load_folder, unwrap_tokenizer
from ..outputs import check_output, staged_folder
from .tokens import add_token_rows, embedding_rows
from .trainer import ADAPTER_CONFIG, ADAPTER_FILE, model_fingerprint, read_adapter_config

def save_model(path, model, tokenizer, hf_config: dict, cfg: Optional[MemoSightConfig],
               force: bool = False, src_path=None) -> Path:
    """Write a standalone MemoSight model folder (weights, ``config.json``,
    tokenizer, ``memosight.json``) that ``mlx_memosight.load`` and
    ``mlx_lm.load`` read; with ``cfg=None`` a plain model folder (no
    ``memosight.json``). Written to a staging folder first: nothing is left
    half-written."""
    from mlx_lm.utils import save_config
    from mlx_lm.utils import save_model as mlx_save_model

    path = Path(path)
    with staged_folder(path, force) as staging:
        mlx_save_model(staging, model)
        config = dict(hf_config)
        config["vocab_size"] = int(embedding_rows(model))
        for key in CHECKPOINT_EXTRA_KEYS:
            if cfg is None:
                config.pop(key, None)
            else:
                config[key] = getattr(cfg, key)
        if cfg is not None:
            eos = config.get("eos_token_id")
            eos = [] if eos is None else (eos if isinstance(eos, list) else [eos])
            if cfg.token_ids.eos not in eos:
                config["eos_token_id"] = eos + [cfg.token_ids.eos]
        save_config(config, config_path=staging / "config.json")
        unwrap_tokenizer(tokenizer).save_pretrained(str(staging))
        if cfg is not None:
            cfg.save(staging)
            write_model_card(staging, cfg, path.name)
        if src_path is not None and (Path(src_path) / "generation_config.json").exists():
            shutil.copy(Path(src_path) / "generation_config.json", staging)
    return path


def load_base(model_path):
    """Load a model folder for training or fusing (:func:`mlx_memosight.loading.load_folder`).

    Returns:
        ``(model, tokenizer, hf_config, cfg_or_None)``.
    """
    folder = load_folder(model_path)
    return folder.model, folder.tokenizer, folder.config, folder.memosight


def read_adapters(adapter_path):
    """The configuration of a folder of MemoSight adapters, checked before
    any weight is loaded: ``adapter_config.json`` with its ``memosight``
    object, and a whole ``adapters.safetensors``.

    Returns:
        ``(adapter config, MemoSight configuration)``.
    """
    adapter_path = Path(adapter_path)
    ac = read_adapter_config(adapter_path)
    where = adapter_path / ADAPTER_CONFIG
    if not (adapter_path / ADAPTER_FILE).is_file():
        raise TrainError(f"{adapter_path / ADAPTER_FILE}: file not found (adapter_path={adapter_path})")
    if not isinstance(ac.get("memosight"), dict):
        raise TrainError(f"{where}: not MemoSight adapters (no 'memosight' object)")
    for key, kind in (("fine_tune_type", str), ("num_layers", int), ("base_fingerprint", str)):
        if key in ac and (not isinstance(ac[key], kind) or isinstance(ac[key], bool)):
            raise TrainError(f"{where}: {key} must be a {kind.__name__}")
    if not isinstance(ac.get("lora_parameters", {}), (dict, type(None))):
        raise TrainError(f"{where}: lora_parameters must be an object")
    cfg = MemoSightConfig.from_dict(ac["memosight"], str(where))
    try:
        check_weight_files([adapter_path / ADAPTER_FILE])
    except ConfigError as e:
        raise TrainError(str(e))
    return ac, cfg


def apply_adapters(model, tokenizer, adapter_path, model_path=None) -> MemoSightConfig:
    """Load MemoSight adapters into a loaded model, as ``mlx_lm.load(...,
    adapter_path=...)`` does. The model may be the plain base the adapters
    were trained from: its MemoSight tokens and rows are added the same way
    again.

    Returns:
        The adapters' MemoSight configuration.

    Raises:
        TrainError: the adapters are missing, not MemoSight's, or of another
            model.
    """
    from mlx_lm.tuner.utils import load_adapters

    adapter_path = Path(adapter_path)
    ac, cfg = read_adapters(adapter_path)
    add_token_rows(model, tokenizer)
    recorded = ac.get("base_fingerprint")
    if recorded is not None and recorded != model_fingerprint(model):
        raise TrainError(f"adapter_path={adapter_path}: adapters of another model than "
                         f"{model_path or 'this one'}", "adapter_path")
    try:
        load_adapters(model, str(adapter_path))
    except (ValueError, KeyError, TypeError) as e:
        # mlx-lm's checks list every tensor; the first line says what is wrong
        raise TrainError(f"{adapter_path}: mlx-lm cannot load these adapters "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    return cfg


def fuse(model_path, adapter_path, save_path, dequantize: bool = False, force: bool = False) -> Path:
    """Fuse trained adapters into their base model and write a standalone
    MemoSight model folder.

    ``model_path`` may be the plain base model the adapters were trained
    from: the MemoSight tokens and rows are added the same way again.
    """
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model

    check_output(save_path, force, folder=True)
    model, tokenizer, config, _ = load_base(model_path)
    cfg = apply_adapters(model, tokenizer, adapter_path, model_path)
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    return save_model(save_path, model, tokenizer, config, cfg, force=force, src_path=model_path)
