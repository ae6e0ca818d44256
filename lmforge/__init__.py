"""lmforge: train a decoder-only GPT from random weights to an aligned chat model.

Public API: `load_checkpoint(path) -> (model, tokenizer_or_None, meta)`,
`save_checkpoint(path, model, tokenizer=None, **meta)`, `load_reward_model(path)`,
`ModelConfig`, `build_model`, `GPT` (`model(input_ids)` returns logits (B, T, V)), and
`generate`. Importing lmforge registers its
non-Llama model classes with transformers' `AutoConfig` / `AutoModelForCausalLM`.

Importing the package is cheap: the names above load torch on first use, and the registration
with transformers happens as soon as transformers itself is imported (at once when it already
is), so `lmforge --help` and `lmforge --version` start without torch.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from lmforge.errors import CheckpointError, ConfigError, DataError, LmforgeError

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and editors
    from importlib.machinery import ModuleSpec

    from lmforge.checkpoint import load_checkpoint, load_reward_model, save_checkpoint
    from lmforge.model import GPT, KVCache, ModelConfig, build_model

__version__ = "0.1.0"

# public name -> the module that defines it, imported on first access (PEP 562)
_LAZY = {
    "load_checkpoint": "lmforge.checkpoint",
    "load_reward_model": "lmforge.checkpoint",
    "save_checkpoint": "lmforge.checkpoint",
    "GPT": "lmforge.model",
    "KVCache": "lmforge.model",
    "ModelConfig": "lmforge.model",
    "build_model": "lmforge.model",
}

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


def __getattr__(name: str) -> Any:
    """Load a public name's module on first access (it imports torch). A submodule's name
    imports it, as when this package imported them eagerly (`lmforge.hf` after `import
    lmforge`)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later accesses skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def _register_with_transformers() -> None:
    """Import lmforge.hf, whose last lines register our classes with transformers' Auto*.

    When lmforge.hf is itself the module importing transformers, it is in sys.modules half
    run; the import below returns it as is and its own last lines register."""
    importlib.import_module("lmforge.hf")


class _RegisterAfterTransformers:
    """Finds nothing itself: when `transformers` is about to be imported, it lets the usual
    finders locate it and runs the registration right after transformers' module has run.
    (A meta path finder by its find_spec alone: importlib.abc costs start-up time.)"""

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # once only, and not asked again by the find_spec below
        spec = importlib.util.find_spec(fullname)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            try:
                run(module)
            finally:
                del loader.exec_module  # the loader's own method again (for reloads)
            _register_with_transformers()

        # An unusual loader that takes no attributes: then `import lmforge.hf` registers.
        with contextlib.suppress(AttributeError, TypeError):
            loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
