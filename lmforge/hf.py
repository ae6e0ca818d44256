"""Hugging Face interoperability: config and key tables, and our classes registered with `Auto*`.

Llama-compatible variants (RMSNorm, pre-norm, RoPE, SwiGLU) are written as `model_type: llama`
with Llama key names, so plain `transformers` loads them with nothing of ours imported. The
other variants are written as `model_type: lmforge`; `import lmforge` registers `LmforgeConfig`,
`LmforgeForCausalLM` and `LmforgeForSequenceClassification` with `AutoConfig`,
`AutoModelForCausalLM` and `AutoModelForSequenceClassification` so that they load too.

A checkpoint's head is named by config.json's `architectures`: `*ForCausalLM` is an LM head
("lm"), `*ForSequenceClassification` with one label is a reward model or critic ("reward").
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutputWithPast

from lmforge.errors import CheckpointError
from lmforge.model import GPT, ModelConfig
from lmforge.reward import ScoreHead, drop_lm_head, positions_from_mask

Head = Literal["lm", "reward"]

try:  # transformers >= 5
    from transformers import PreTrainedConfig as _HFConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as _HFConfig

_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

# Our parameter name (per layer, after "layers.N.") -> Llama's (after "model.layers.N.").
_LLAMA_LAYER_KEYS = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LLAMA_TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def is_llama_compatible(cfg: ModelConfig) -> bool:
    """Whether transformers' LlamaForCausalLM computes exactly what this config computes."""
    return (
        cfg.norm == "rmsnorm"
        and cfg.norm_position == "pre"
        and cfg.position == "rope"
        and cfg.mlp == "swiglu"
    )


def to_llama_key(name: str) -> str:
    """Our parameter name -> the Llama state-dict key."""
    if name in _LLAMA_TOP_KEYS:
        return _LLAMA_TOP_KEYS[name]
    m = _LAYER_RE.match(name)
    if not m or m.group(2) not in _LLAMA_LAYER_KEYS:
        raise KeyError(f"no Llama name for parameter {name!r}")
    return f"model.layers.{m.group(1)}.{_LLAMA_LAYER_KEYS[m.group(2)]}.{m.group(3)}"


def from_llama_key(key: str) -> str | None:
    """A Llama state-dict key -> our parameter name (None for keys we do not keep)."""
    for ours, theirs in _LLAMA_TOP_KEYS.items():
        if key == theirs:
            return ours
    m = _HF_LAYER_RE.match(key)
    if m:
        for ours, theirs in _LLAMA_LAYER_KEYS.items():
            if m.group(2) == theirs:
                return f"layers.{m.group(1)}.{ours}.{m.group(3)}"
    if key.endswith("rotary_emb.inv_freq"):  # old transformers saved this recomputable buffer
        return None
    return key  # left as is: reported as unexpected by the loader


def to_hf_config(
    cfg: ModelConfig,
    *,
    dtype: torch.dtype,
    token_ids: dict[str, Any] | None = None,
    head: Head = "lm",
) -> _HFConfig:
    """The `config.json` object for a model: a LlamaConfig when compatible, else ours.

    head "reward" names the sequence-classification class with one label (a scalar score).
    """
    ids = dict(token_ids or {})
    family = "Llama" if is_llama_compatible(cfg) else "Lmforge"
    if head == "reward":
        ids["num_labels"] = 1
        arch = f"{family}ForSequenceClassification"
    else:
        arch = f"{family}ForCausalLM"
    if is_llama_compatible(cfg):
        return transformers.LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.dim,
            intermediate_size=cfg.hidden_dim,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.head_size,
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            tie_word_embeddings=cfg.tie_embeddings,
            attention_bias=cfg.bias,
            mlp_bias=cfg.bias,
            attention_dropout=cfg.attn_dropout,
            initializer_range=cfg.init_std,
            hidden_act="silu",
            architectures=[arch],
            dtype=dtype,
            **ids,
        )
    return LmforgeConfig(
        **dataclasses.asdict(cfg),
        architectures=[arch],
        dtype=dtype,
        **ids,
    )


def head_of(hf: dict[str, Any], where: str) -> Head:
    """The head a `config.json` dict describes: "reward" for a one-label sequence classifier,
    "lm" otherwise (a causal LM, or a config without architectures)."""
    archs = hf.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        return "lm"
    # transformers' rule: num_labels, else the size of id2label, else 2.
    labels = hf.get("num_labels", len(hf.get("id2label") or {}) or 2)
    if labels != 1:
        raise CheckpointError(
            f"{where}: a sequence classifier with {labels} labels; lmforge reward models have one"
        )
    return "reward"


def _llama_rope_theta(hf: dict[str, Any], where: str) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", "default") if params else scaling.get("rope_type", "default")
    if scaling and scaling.get("type", scaling.get("rope_type")) not in (None, "default"):
        kind = scaling.get("type", scaling.get("rope_type"))
    if kind != "default":
        raise CheckpointError(
            f"{where}: rope scaling '{kind}' is not supported; lmforge loads plain RoPE models"
        )
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def from_hf_config(hf: dict[str, Any], where: str) -> ModelConfig:
    """ModelConfig from the dict in a `config.json` (model_type llama or lmforge)."""
    kind = hf.get("model_type")
    try:
        if kind == "lmforge":
            names = {f.name for f in dataclasses.fields(ModelConfig)}
            return ModelConfig(**{k: v for k, v in hf.items() if k in names})
        if kind == "llama":
            if hf.get("hidden_act", "silu") != "silu":
                raise CheckpointError(f"{where}: hidden_act must be 'silu', got {hf['hidden_act']}")
            if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
                raise CheckpointError(f"{where}: attention_bias and mlp_bias must be equal")
            return ModelConfig(
                vocab_size=hf["vocab_size"],
                dim=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"],
                n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                head_dim=hf.get("head_dim"),
                ffn_dim=hf["intermediate_size"],
                max_seq_len=hf.get("max_position_embeddings", 2048),
                norm="rmsnorm",
                norm_eps=hf.get("rms_norm_eps", 1e-6),
                norm_position="pre",
                position="rope",
                rope_theta=_llama_rope_theta(hf, where),
                mlp="swiglu",
                bias=bool(hf.get("attention_bias", False)),
                attn_dropout=float(hf.get("attention_dropout", 0.0)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                init_std=float(hf.get("initializer_range", 0.02)),
            )
    except KeyError as e:
        raise CheckpointError(f"{where}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    raise CheckpointError(
        f"{where}: model_type {kind!r} is not supported; lmforge loads 'llama' and 'lmforge'"
    )


class LmforgeConfig(_HFConfig):
    """Hugging Face config of a non-Llama lmforge variant: the ModelConfig fields, flat."""

    model_type = "lmforge"
    attribute_map = {  # noqa: RUF012 - the name transformers looks up
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(self, **kwargs: Any) -> None:
        defaults = dataclasses.asdict(ModelConfig())
        for name, default in defaults.items():
            setattr(self, name, kwargs.pop(name, default))
        kwargs.setdefault("tie_word_embeddings", self.tie_embeddings)
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """The lmforge ModelConfig these fields describe."""
        return ModelConfig(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)}
        )


class LmforgeForCausalLM(PreTrainedModel, GenerationMixin):
    """Our GPT behind the transformers interface, for variants that Llama cannot express."""

    config_class = LmforgeConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]  # noqa: RUF012
    # transformers 5 maps tied keys to their source; 4.x lists them.
    _tied_weights_keys = (
        {"model.output.weight": "model.tok_embeddings.weight"}
        if _TRANSFORMERS_5
        else ["model.output.weight"]
    )

    def __init__(self, config: LmforgeConfig) -> None:
        super().__init__(config)
        self.model = GPT(config.model_config())
        self.model.init_weights()
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Initialisation is the GPT's own (done in __init__); loading overwrites it."""

    def get_input_embeddings(self) -> torch.nn.Module:
        """The token embedding."""
        return self.model.tok_embeddings

    def get_output_embeddings(self) -> torch.nn.Module:
        """The output projection."""
        return self.model.output

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (B, T, V) and, with labels, the next-token loss (labels unshifted, as in HF)."""
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        logits = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any
    ) -> dict[str, Any]:
        """No KV cache through this wrapper: every step recomputes the whole sequence (lmforge's
        own generator is the fast path)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class LmforgeForSequenceClassification(PreTrainedModel):
    """An lmforge reward model (backbone + one-label score head) behind the transformers
    interface, for variants that Llama cannot express. Keys: `model.*` and `score.weight`."""

    config_class = LmforgeConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]  # noqa: RUF012
    _tied_weights_keys = LmforgeForCausalLM._tied_weights_keys

    def __init__(self, config: LmforgeConfig) -> None:
        super().__init__(config)
        if config.num_labels != 1:
            raise ValueError(f"lmforge reward models have one label, not {config.num_labels}")
        self.model = drop_lm_head(GPT(config.model_config()))
        self.model.init_weights()
        self.score = ScoreHead(config.dim)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Initialisation is done in __init__; loading overwrites it."""

    def get_input_embeddings(self) -> torch.nn.Module:
        """The token embedding."""
        return self.model.tok_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: Any,
    ) -> SequenceClassifierOutputWithPast:
        """Scores (B, 1) at each row's last token that is not pad_token_id (transformers' rule,
        `GenericForSequenceClassification`); with labels (B,), their mean squared error."""
        if position_ids is None and attention_mask is not None:
            position_ids = positions_from_mask(attention_mask)  # (B, T)
        h = self.model.hidden_states(
            input_ids, attention_mask=attention_mask, position_ids=position_ids
        )  # (B, T, D)
        b, t = input_ids.shape
        pad = self.config.pad_token_id
        if pad is None:
            if b != 1:
                raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
            last = torch.full((b,), t - 1, device=input_ids.device)
        else:
            index = torch.arange(t, device=input_ids.device)  # (T,)
            last = (index * (input_ids != pad)).argmax(-1)  # (B,): rightmost non-pad token
        scores = self.score(h[torch.arange(b, device=h.device), last])  # (B, 1)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.mse_loss(scores.squeeze(-1), labels.float().view(-1))
        return SequenceClassifierOutputWithPast(loss=loss, logits=scores)


AutoConfig.register("lmforge", LmforgeConfig, exist_ok=True)
AutoModelForCausalLM.register(LmforgeConfig, LmforgeForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(
    LmforgeConfig, LmforgeForSequenceClassification, exist_ok=True
)
