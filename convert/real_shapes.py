"""Random-weight PyTorch MemoSight checkpoints with the shapes of real models.

Weights decide what a model says, not whether conversion, positions, masks,
memory and speed are right, so the real models' published ``config.json``
values (``convert/shapes.json``, with the source of each) are enough to
exercise this project at the sizes people run. A checkpoint gets:

* the family's real tokenizer from ``../shared/tokenizers`` with the MemoSight
  tokens added, and their embedding rows initialised as the reference does
  (:func:`convert.make_checkpoint.init_token_rows`);
* random weights as transformers initialises them (normal with the config's
  ``initializer_range``, norms at one, biases at zero), in bfloat16 by default;
* ``model-0000k-of-0000n.safetensors`` shards split by huggingface_hub's
  ``split_torch_state_dict_into_shards``, the function ``save_pretrained``
  uses, with its index. Tensors are made one shard at a time, so an 8B
  checkpoint needs one shard's memory, not the model's;
* a transformers-5 ``config.json`` (or a transformers-4 one), with the
  reference's extra keys. Depth may be reduced (``layers``).

    python -m convert.real_shapes qwen2.5-0.5b-instruct -o ckpt [--layers 2] [--max-shard-size 5GB]
"""

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

from convert.make_checkpoint import (FAMILIES, MEMOSIGHT_TOKENS, _known, init_token_rows,
                                     template_tokens, to_transformers4_config)

SHAPES_FILE = Path(__file__).with_name("shapes.json")
SHARED = Path(__file__).resolve().parents[2] / "shared"


def shapes() -> dict:
    """``{name: {"repo", "family", "tokenizer", "config", "sources"}}``."""
    return json.loads(SHAPES_FILE.read_text())


def shape_config(name: str, layers: Optional[int] = None) -> dict:
    """The published ``config.json`` of a shape (``layers`` reduces its depth)."""
    table = shapes()
    if name not in table:
        raise SystemExit(f"unknown shape {name!r} (known: {', '.join(table)})")
    config = dict(table[name]["config"])
    if layers is not None:
        config["num_hidden_layers"] = layers
        if "max_window_layers" in config:
            config["max_window_layers"] = min(config["max_window_layers"], layers)
    return config


def tokenizer_for(name: str, shared: Path = SHARED):
    from transformers import AutoTokenizer

    path = shared / "tokenizers" / shapes()[name]["tokenizer"]
    if not path.is_dir():
        raise SystemExit(f"{path}: the shape's tokenizer is missing (../shared/tokenizers)")
    return AutoTokenizer.from_pretrained(str(path))


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _random(name: str, shape, dtype, std: float, generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    return (torch.randn(shape, generator=generator, dtype=torch.float32) * std).to(dtype)


def make_real_checkpoint(out, name: str, layers: Optional[int] = None, dtype: str = "bfloat16",
                         max_shard_size="5GB", transformers4_config: bool = False, seed: int = 0,
                         shared: Path = SHARED) -> dict:
    """Write a random-weight MemoSight checkpoint of the shape ``name``.

    Returns:
        ``{"path", "config", "vocab_size", "files", "bytes"}``.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import AutoConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = shapes()[name]
    family = table["family"]
    tok = tokenizer_for(name, shared)
    added = [(t, d) for t, d in MEMOSIGHT_TOKENS if not _known(tok, t)]
    tok.add_tokens([t for t, _ in added], special_tokens=True)
    published = shape_config(name, layers)
    published.pop("architectures", None)
    config = AutoConfig.for_model(**published)
    config.vocab_size = len(tok)
    torch_dtype = getattr(torch, dtype)
    config.dtype = torch_dtype
    _, bos, eos = template_tokens(family, tok)
    config.eos_token_id = tok.convert_tokens_to_ids(eos)
    if bos is not None:
        config.bos_token_id = tok.convert_tokens_to_ids(bos)
    for key in ("mtp_loss_weight", "lm_loss_weight", "max_offset"):
        setattr(config, key, FAMILIES[family][key])
    model = _meta_model(config)
    state = {k: v for k, v in model.state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    std = float(getattr(config, "initializer_range", 0.02))
    generator = torch.Generator().manual_seed(seed)
    n_base = len(tok) - len(added)
    total = 0
    for filename, names in split.filename_to_tensors.items():
        shard = {}
        for k in names:
            t = _random(k, state[k].shape, torch_dtype, std, generator)
            if k in ("model.embed_tokens.weight", "lm_head.weight"):
                init_token_rows(t, tok, added, n_base)
            shard[k] = t.contiguous()
            total += t.numel() * t.element_size()
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": {"total_parameters": sum(v.numel() for v in model.state_dict().values()),
                              **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    tok.save_pretrained(out)
    if transformers4_config:
        to_transformers4_config(out)
    return {"path": out, "config": json.loads((out / "config.json").read_text()), "vocab_size": len(tok),
            "files": list(split.filename_to_tensors), "bytes": total}


def main():
    p = argparse.ArgumentParser(description="Make a random-weight MemoSight checkpoint of a real model's shape.")
    p.add_argument("shape", choices=sorted(shapes()), help="the model whose config.json to use")
    p.add_argument("-o", "--out", required=True, help="checkpoint folder to write")
    p.add_argument("--layers", type=int, help="reduce the depth to this many layers")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--max-shard-size", default="5GB", help="as save_pretrained's (default: 5GB)")
    p.add_argument("--transformers4-config", action="store_true", help="write config.json as transformers 4 does")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    info = make_real_checkpoint(args.out, args.shape, args.layers, args.dtype, args.max_shard_size,
                                args.transformers4_config, args.seed)
    print(f"wrote {args.out}: {args.shape}, {info['config']['num_hidden_layers']} layers, vocab "
          f"{info['vocab_size']}, {info['bytes'] / 1e9:.2f} GB in {len(info['files'])} file(s)")


if __name__ == "__main__":
    main()
