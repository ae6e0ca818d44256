"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") through `peft`.

`apply_lora` injects adapters into the GPT in place (`peft.inject_adapter_in_model`: no
PeftModel wrapper, so the model keeps its forward and its `hidden_states()`), and freezes every
other parameter. `merge_lora` folds W + (α/r)·B·A into each base weight and puts the plain
`nn.Linear` back, so the result is a plain GPT whose state dict has exactly a GPT's keys and
`save_checkpoint` writes the one format. Adapters are not saved on their own.

Only the attention and MLP projections are adaptable. The embedding and the output projection
(an `LMHead`, which computes the fused loss from its weight directly) stay frozen; so a tied
embedding stays tied, and merging never touches it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lmforge.config import option
from lmforge.errors import ConfigError
from lmforge.model import GPT

# Linear layers of the GPT that LoRA can adapt (module names, after the last dot).
ADAPTABLE = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
ADAPTER_NAME = "default"


@dataclass
class LoraSettings:
    """Low-rank adapters on the GPT's linear layers (Hu et al. 2021)."""

    enabled: bool = option(False, "Train LoRA adapters instead of every weight.")
    rank: int = option(8, "Rank r of each adapter (A is r×in, B is out×r).")
    alpha: float = option(16, "Scale α: the update is (α/r)·B·A.")
    dropout: float = option(0.0, "Dropout on the adapter's input.")
    target_modules: list[str] = option(
        default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
        doc="Linear layers to adapt, by name: wq wk wv wo (attention), w1 w2 w3 (MLP).",
    )

    def validate(self, prefix: str = "lora") -> None:
        """Reject values outside their range and unknown layer names, naming the key."""
        p = f"{prefix}." if prefix else ""
        if self.rank <= 0:
            raise ConfigError(f"{p}rank: must be positive, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"{p}alpha: must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{p}dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError(f"{p}target_modules: empty; name at least one of {ADAPTABLE}")
        for i, name in enumerate(self.target_modules):
            if name not in ADAPTABLE:
                close = difflib.get_close_matches(name, ADAPTABLE, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; choose from {ADAPTABLE}"
                raise ConfigError(f"{p}target_modules[{i}]: unknown layer {name!r}{hint}")


def apply_lora(model: GPT, cfg: LoraSettings) -> GPT:
    """Inject LoRA adapters into `model` in place and make them its only trainable parameters.

    Disabled settings return the model untouched. B starts at zero (peft's default, as in the
    paper), so the adapted model first computes exactly what the base model does. Adapters are
    created in each base layer's dtype and device.
    """
    if not cfg.enabled:
        return model
    cfg.validate("lora")
    for name in cfg.target_modules:
        if not any(n.rsplit(".", 1)[-1] == name for n, _ in model.named_modules()):
            raise ConfigError(f"lora.target_modules: this model has no {name!r} layer")
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters")
    peft_cfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),  # peft matches a list by last name component
        bias="none",
    )
    inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters of a model (what the optimizer trains)."""
    return [p for n, p in model.named_parameters() if ".lora_" in n]


def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its base weight and remove peft's modules, in place.

    Returns a plain GPT (same object) with every parameter trainable again, as `build_model`
    gives it; its state dict has exactly the keys of a GPT without adapters.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge(safe_merge=True)  # raises if the merged weight is not finite
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(True)
    return model
