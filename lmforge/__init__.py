"""lmforge: train a decoder-only GPT from random weights to an aligned chat model.

Public API: `load_checkpoint(path) -> (model, tokenizer_or_None, meta)`,
`save_checkpoint(path, model, tokenizer=None, **meta)`, `load_reward_model(path)`,
`ModelConfig`, `build_model`, `GPT` (`model(input_ids)` returns logits (B, T, V)), and
`generate`. Importing lmforge registers its
non-Llama model classes with transformers' `AutoConfig` / `AutoModelForCausalLM`.
"""

from lmforge import hf as _hf  # noqa: F401  (registers LmforgeConfig with transformers' Auto*)
from lmforge.checkpoint import load_checkpoint, load_reward_model, save_checkpoint
from lmforge.errors import CheckpointError, ConfigError, DataError, LmforgeError
from lmforge.model import GPT, KVCache, ModelConfig, build_model

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "KVCache",
    "LmforgeError",
    "ModelConfig",
    "build_model",
    "load_checkpoint",
    "load_reward_model",
    "save_checkpoint",
]
