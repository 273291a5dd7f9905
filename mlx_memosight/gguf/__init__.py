"""GGUF export and import with the MemoSight configuration.

* :mod:`.tokenizer`: ``tokenizer.ggml.*`` from a Hugging Face tokenizer and back;
* :mod:`.metadata`: tensor types, architecture keys, Llama's q / k row order
  and the ``memosight.*`` keys;
* :mod:`.export`: an MLX model folder to a GGUF file (``convert --gguf``);
* :mod:`.reader`: a GGUF file to model, tokenizer and MemoSight
  configuration (``generate --model FILE.gguf``).
"""

from .export import ExportResult, export_gguf, mlx_q4_to_q4_1, plan_tensors
from .metadata import GGUF_TYPES, PREFIX, GGUFError, llama_permute, llama_unpermute, read_memosight
from .reader import load_gguf, read_gguf, scan_gguf
from .tokenizer import CHECK_TEXT, TokenizerMeta, build_tokenizer, tokenizer_metadata

__all__ = [
    "CHECK_TEXT", "GGUF_TYPES", "PREFIX", "ExportResult", "GGUFError", "TokenizerMeta",
    "build_tokenizer", "export_gguf", "llama_permute", "llama_unpermute", "load_gguf",
    "mlx_q4_to_q4_1", "plan_tensors", "read_gguf", "read_memosight", "scan_gguf",
    "tokenizer_metadata",
]
