"""Hugging Face interoperability: config and key tables, and our classes registered with `Auto*`.

Llama-compatible variants (RMSNorm, pre-norm, RoPE, SwiGLU) are written in their own family's
`model_type` (`llama`, `qwen2` or `mistral`, ModelConfig.family) with Llama key names, which the
three share, so plain `transformers` loads them with nothing of ours imported; RoPE scaling
(linear, dynamic, llama3) travels in `rope_parameters` (transformers 5) or `rope_scaling` (4.x),
and both spellings are read. The other variants are written as `model_type: lmforge`;
`import lmforge` registers `LmforgeConfig`, `LmforgeForCausalLM` and
`LmforgeForSequenceClassification` with `AutoConfig`, `AutoModelForCausalLM` and
`AutoModelForSequenceClassification` so that they load too.

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


# model_type -> the prefix of transformers' class names.
_CLASS_PREFIX = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "lmforge": "Lmforge"}
_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# What transformers' config classes assume when config.json leaves a key out.
_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "mistral": 131072}
_DEFAULT_WINDOW = 4096  # Qwen2Config's and MistralConfig's sliding_window


def is_llama_compatible(cfg: ModelConfig) -> bool:
    """Whether transformers' class of cfg.family (LlamaForCausalLM, Qwen2ForCausalLM,
    MistralForCausalLM) computes exactly what this config computes, with Llama's key names."""
    qkv, out, _ = cfg.linear_biases()
    # Llama has one attention_bias for q/k/v and o; Qwen2's and Mistral's are fixed (validated).
    return cfg.llama_style and (cfg.family != "llama" or qkv == out)


def hf_model_type(cfg: ModelConfig) -> str:
    """The `model_type` a checkpoint of this config is written with."""
    return cfg.family if is_llama_compatible(cfg) else "lmforge"


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
    model_type = hf_model_type(cfg)
    prefix = _CLASS_PREFIX[model_type]
    if head == "reward":
        ids["num_labels"] = 1
        arch = f"{prefix}ForSequenceClassification"
    else:
        arch = f"{prefix}ForCausalLM"
    if model_type != "lmforge":
        return _family_config(cfg, model_type, architectures=[arch], dtype=dtype, **ids)
    return LmforgeConfig(
        **dataclasses.asdict(cfg),
        architectures=[arch],
        dtype=dtype,
        **ids,
    )


def _family_config(cfg: ModelConfig, model_type: str, **extra: Any) -> _HFConfig:
    """transformers' own config class (LlamaConfig, Qwen2Config, MistralConfig) for cfg."""
    scaling = cfg.rope_scaling()
    rope: dict[str, Any] | None = None
    positions = cfg.max_seq_len
    if scaling is not None:
        rope = {"rope_type": scaling.kind, "factor": scaling.factor}
        if scaling.kind == "llama3":
            rope["low_freq_factor"] = scaling.low_freq_factor
            rope["high_freq_factor"] = scaling.high_freq_factor
            rope["original_max_position_embeddings"] = scaling.original_max_len
        if scaling.kind == "dynamic":
            # transformers scales from max_position_embeddings: it must be the original length
            # (config.json cannot hold max_seq_len then; lmforge.json keeps it).
            positions = scaling.original_max_len
    _, out, mlp = cfg.linear_biases()
    if model_type == "llama":
        extra.update(attention_bias=out, mlp_bias=mlp)
    elif model_type == "qwen2":  # full attention in every layer
        extra.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    else:
        extra.update(sliding_window=None)
    config_class = getattr(transformers, f"{_CLASS_PREFIX[model_type]}Config")
    return config_class(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_size,
        max_position_embeddings=positions,
        rms_norm_eps=cfg.norm_eps,
        # Both spellings are accepted by transformers 4.x and 5 (which moves them into
        # rope_parameters); 4.x would not know rope_parameters.
        rope_theta=cfg.rope_theta,
        rope_scaling=rope,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=cfg.attn_dropout,
        initializer_range=cfg.init_std,
        hidden_act="silu",
        **extra,
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


def _rope_fields(hf: dict[str, Any], where: str, max_positions: int) -> dict[str, Any]:
    """ModelConfig's rope fields (and max_seq_len) from a Llama-style config.json.

    transformers 5 writes `rope_parameters` (rope_theta inside), 4.x `rope_scaling` (`type` or
    `rope_type`) next to a top-level `rope_theta`; like transformers 5, rope_scaling wins when
    both are there.
    """
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    spec = hf.get(key) or {}
    if not isinstance(spec, dict) or any(isinstance(v, dict) for v in spec.values()):
        raise CheckpointError(f"{where}: {key} must be one flat mapping (per-layer RoPE is not)")
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise CheckpointError(
            f"{where}: {key}.rope_type {kind!r} is not supported; lmforge implements "
            f"{', '.join(_ROPE_TYPES)}"
        )
    partial = spec.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise CheckpointError(f"{where}: partial_rotary_factor={partial} is not supported (1 is)")
    fields: dict[str, Any] = {
        "rope_theta": float(spec.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "rope_type": kind,
        "max_seq_len": max_positions,
    }

    def need(name: str) -> float:
        if spec.get(name) is None:
            raise CheckpointError(f"{where}: {key}.{name} is missing (rope_type {kind!r} needs it)")
        return float(spec[name])

    if kind != "default":
        fields["rope_factor"] = need("factor")
    if kind == "dynamic":
        # transformers scales from max_position_embeddings on; the context reached is
        # factor times longer (the meaning of `factor` in transformers' RopeParameters).
        fields["rope_original_max_seq_len"] = max_positions
        fields["max_seq_len"] = max(max_positions, int(max_positions * fields["rope_factor"]))
    if kind == "llama3":
        # As transformers: a top-level original_max_position_embeddings (Phi-3 style) first.
        original = hf.get("original_max_position_embeddings")
        original = original or spec.get("original_max_position_embeddings") or max_positions
        fields.update(
            rope_low_freq_factor=need("low_freq_factor"),
            rope_high_freq_factor=need("high_freq_factor"),
            rope_original_max_seq_len=int(original),
        )
    return fields


def _check_window(hf: dict[str, Any], where: str, kind: str, context: int) -> None:
    """Refuse a sliding window that a sequence of `context` tokens would reach: lmforge
    attends over the whole sequence, so such a model would compute something else."""
    if kind == "qwen2":
        if not hf.get("use_sliding_window", False):
            return  # Qwen2Config drops the window then
        start = hf.get("max_window_layers", 28)
        layers = hf.get("layer_types") or [
            "sliding_attention" if i >= start else "full_attention"
            for i in range(hf["num_hidden_layers"])
        ]
        if "sliding_attention" not in layers:
            return
    elif kind != "mistral":
        return
    window = hf.get("sliding_window", _DEFAULT_WINDOW)
    if window is not None and window < context:
        raise CheckpointError(
            f"{where}: sliding_window={window} is shorter than the context of {context} tokens; "
            "lmforge attends over the whole sequence (only models whose window is null or at "
            "least max_position_embeddings load)"
        )


def _llama_style_config(hf: dict[str, Any], where: str, kind: str) -> ModelConfig:
    """ModelConfig from the config.json of a llama, qwen2 or mistral model."""
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act must be 'silu', got {hf['hidden_act']!r}")
    rope = _rope_fields(hf, where, hf.get("max_position_embeddings", _MAX_POSITIONS[kind]))
    _check_window(hf, where, kind, rope["max_seq_len"])
    biases: dict[str, Any] = {"family": kind}  # qwen2 and mistral: the family's fixed layout
    if kind == "llama":
        attention = bool(hf.get("attention_bias", False))
        mlp = bool(hf.get("mlp_bias", False))
        # One flag when they agree: the form lmforge wrote before the two flags existed.
        split = {"attention_bias": attention, "mlp_bias": mlp}
        biases = {"bias": attention} if attention == mlp else split
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        ffn_dim=hf["intermediate_size"],
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        norm_position="pre",
        position="rope",
        mlp="swiglu",
        attn_dropout=float(hf.get("attention_dropout", 0.0)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        **rope,
        **biases,
    )


def from_hf_config(hf: dict[str, Any], where: str) -> ModelConfig:
    """ModelConfig from the dict in a `config.json` (model_type llama, qwen2, mistral or
    lmforge); anything it cannot compute exactly is a one-line CheckpointError naming the key."""
    kind = hf.get("model_type")
    try:
        if kind == "lmforge":
            names = {f.name for f in dataclasses.fields(ModelConfig)}
            return ModelConfig(**{k: v for k, v in hf.items() if k in names})
        if kind in _MAX_POSITIONS:
            return _llama_style_config(hf, where, kind)
    except KeyError as e:
        raise CheckpointError(f"{where}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    supported = ", ".join(repr(k) for k in (*_MAX_POSITIONS, "lmforge"))
    raise CheckpointError(
        f"{where}: model_type {kind!r} is not supported; lmforge loads {supported}"
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
