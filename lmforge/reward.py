"""Reward models and critics: the GPT backbone with a scalar head instead of the LM head.

A reward model scores a whole sequence at its last real token (the pooling of Ziegler et al. 2019
and Ouyang et al. 2022, and what transformers' `LlamaForSequenceClassification` does); a critic
(PPO's value model) reads the same head at every position. Both go through the backbone's
`hidden_states()`, never the LM head. On disk they are one format: `checkpoint.py` writes them so
that `AutoModelForSequenceClassification` loads them (Llama key names plus `score.weight`).

Which token a chat's score is read at: the last token of `tokenizer.apply_chat_template(prompt +
[answer])` that is not the pad id. That is where the template's rendering ends, after the answer's
end-of-turn token and anything the template writes after it: the newline after `<|end|>` for
lmforge's template (and after ChatML's `<|im_end|>`), `<|eot_id|>` itself for Llama 3's. It is the
token transformers' classifier reads of the same ids (the last one that is not padding), so a
chat scored through `apply_chat_template` and `AutoModelForSequenceClassification` gets lmforge's
score. Training rows (lmforge.data.chat_datasets.PreferenceDataset) end exactly there and pass it
as `last_index`. A score read at another token (the end-of-turn token when the template writes a
newline after it) is a different number: rows must be encoded the way the model was trained.

Shapes: B batch, T sequence length, D model width.
"""

from __future__ import annotations

import math
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model import GPT, ModelConfig


class ScoreHead(nn.Linear):
    """`nn.Linear(dim, 1, bias=False)` computed in fp32.

    Scores are compared by differences (Bradley-Terry) and regressed against returns (PPO); a bf16
    score keeps ~3 significant digits, too few for either, so the head upcasts its input and
    weight. It stays a module of its own so that ZeRO-3 gathers its weight when it runs.
    """

    def __init__(
        self,
        dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, 1, bias=False, device=device, dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., D) -> fp32 scores (..., 1)."""
        return F.linear(h.float(), self.weight.float())


class NoLMHead(nn.Module):
    """Takes the place of an untied backbone's LM head in a reward model: no weight, so the
    vocabulary-sized matrix neither costs memory nor sits in the optimizer without a gradient."""

    def forward(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Always raises: a reward model's backbone is read through `hidden_states()`."""
        raise RuntimeError(
            "this backbone belongs to a reward model and has no LM head; use hidden_states()"
        )


def drop_lm_head(backbone: GPT) -> GPT:
    """Remove the LM head of an untied backbone, in place (a tied one costs nothing: its output
    weight is the embedding, and named_parameters() lists it once). Returns the backbone."""
    if not backbone.cfg.tie_embeddings and not isinstance(backbone.output, NoLMHead):
        backbone.output = NoLMHead()  # type: ignore[assignment]
    return backbone


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index (B,) of the last position whose mask is 1: the last real token under right padding,
    T-1 under left padding or none. The same rule transformers applies to `input_ids != pad`."""
    t = attention_mask.shape[-1]
    index = torch.arange(t, device=attention_mask.device)  # (T,)
    return (index * (attention_mask != 0)).argmax(-1)  # (B,): largest index among real tokens


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) that count real tokens only (0..n-1 under right padding, which is what
    transformers uses; left padding starts each row at 0 where its tokens start, as `generate`)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class RewardModel(nn.Module):
    """A GPT backbone with a scalar head: `model(ids, mask)` -> (B,) fp32 sequence scores,
    `model.values(ids, mask)` -> (B, T) fp32 per-token values.

    The backbone is held, not copied: its parameters are this module's parameters, so DeepSpeed
    sees one model. An untied backbone loses its LM head (see `drop_lm_head`).
    """

    def __init__(self, backbone: GPT) -> None:
        super().__init__()
        self.backbone = drop_lm_head(backbone)
        w = backbone.tok_embeddings.weight
        self.score = ScoreHead(backbone.cfg.dim, device=w.device, dtype=w.dtype)

    @property
    def cfg(self) -> ModelConfig:
        """The backbone's architecture (what a checkpoint's config.json describes)."""
        return self.backbone.cfg

    @torch.no_grad()
    def init_score(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, 1/sqrt(D+1)) head, as in Ziegler et al. 2019 (lm-human-preferences): after
        the final norm ‖h‖ ≈ sqrt(D), so initial scores have a standard deviation near 1."""
        self.score.weight.normal_(0.0, 1.0 / math.sqrt(self.cfg.dim + 1), generator=generator)

    def _hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        if position_ids is None and attention_mask is not None:
            position_ids = positions_from_mask(attention_mask)  # (B, T)
        return self.backbone.hidden_states(
            input_ids, attention_mask=attention_mask, position_ids=position_ids
        )  # (B, T, D)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        last_index: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> fp32 scores (B,) read at each row's last real token.

        That token is `last_index` (B,) when given, else the last position where attention_mask
        (B, T) is 1, else T-1. For a chat it is the last non-pad token of its
        `apply_chat_template` ids (see the module docstring): the one transformers reads.
        Position ids default to counting real tokens (see `positions_from_mask`).
        """
        h = self._hidden(input_ids, attention_mask, position_ids)  # (B, T, D)
        b, t = input_ids.shape
        if last_index is None:
            if attention_mask is None:
                last_index = torch.full((b,), t - 1, device=input_ids.device)
            else:
                last_index = last_token_index(attention_mask)
        rows = torch.arange(b, device=input_ids.device)
        pooled = h[rows, last_index.to(input_ids.device)]  # (B, D)
        return self.score(pooled).squeeze(-1)  # (B,)

    def values(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> fp32 per-token values (B, T) (PPO's critic). Values at padded
        positions are computed but meaningless; the caller masks them."""
        h = self._hidden(input_ids, attention_mask, position_ids)  # (B, T, D)
        return self.score(h).squeeze(-1)  # (B, T)


def build_reward_model(backbone: GPT, *, seed: int | None = None) -> RewardModel:
    """Wrap `backbone` (taken over, not copied) with a freshly initialised score head.

    The head is normal(0, 1/sqrt(D+1)) rather than zeros: with zeros, d score / d h = 0, so the
    backbone gets no gradient until the head has moved, and every pair starts tied; the small
    random head gives the backbone a learning signal from the first step, and its offset is
    irrelevant to the Bradley-Terry loss, which sees only differences. On the meta device
    nothing is initialised.
    """
    model = RewardModel(backbone)
    weight = model.score.weight
    if weight.device.type != "meta":
        gen = None
        if seed is not None:
            gen = torch.Generator(device=weight.device).manual_seed(seed)
        model.init_score(gen)
    return model
