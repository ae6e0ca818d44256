"""An lm-evaluation-harness model backed by an lmforge GPT, in the process that loaded it.

The harness asks for three things: log-likelihoods of continuations, rolling log-likelihoods of
whole documents, and generations until a stop string. All three run on lmforge's own model and
decoding (`lmforge.generate`), so the numbers are those of the checkpoint as lmforge runs it, and
the same object serves a model that is still training. Under torch.distributed the harness gives
each rank its share of the requests and gathers the results through the methods below.

Shapes: B rows in a batch, T tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lmforge.generate import GenerateConfig, generate
from lmforge.model import GPT

Scored = tuple[float, bool]  # (log-likelihood, whether greedy decoding gives the continuation)


def _stop_ids(tokenizer: Any) -> list[int]:
    from lmforge.stage import stop_ids

    return list(stop_ids(tokenizer))


class LmforgeLM(TemplateLM):
    """A harness model over `model` (an lmforge GPT, or a module with the same forward) and its
    Hugging Face tokenizer. `batch_size` rows go through one forward pass; `max_length` caps the
    tokens a row may hold (the model's position limit by default)."""

    def __init__(
        self,
        model: GPT | torch.nn.Module,
        tokenizer: Any,
        *,
        batch_size: int = 16,
        max_length: int = 0,
        add_bos: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)
        cfg = getattr(model, "cfg", None)
        self.max_length = max_length or int(getattr(cfg, "max_seq_len", 2048))
        self.add_bos = add_bos
        self._device = next(model.parameters()).device
        if dist.is_available() and dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    # --- what the harness reads -------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else 0)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "lmforge")).replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **_: Any
    ) -> list[int]:
        """Token ids of `string`; special tokens written in the text (a chat template's) count
        as those tokens. A BOS is added only when asked (add_bos, or add_special_tokens)."""
        ids = list(self.tokenizer.encode(string, add_special_tokens=False))
        bos = self.tokenizer.bos_token_id
        wants_bos = self.add_bos if add_special_tokens is None else add_special_tokens
        if wants_bos and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The model's chat template over the harness's chat, as text."""
        return str(
            self.tokenizer.apply_chat_template(
                chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        )

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    # --- distributed primitives the harness's evaluator calls -------------------------------

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 0:  # a count per rank: gathered into a (world,) vector
            tensor = tensor[None]
        if self.world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)  # gloo has no gather_object to one rank
        return out if self.rank == dst else None

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # --- scoring ----------------------------------------------------------------------------

    @torch.no_grad()
    def _score_batch(self, rows: Sequence[tuple[list[int], list[int]]]) -> list[Scored]:
        """(context ids, continuation ids) rows -> (sum of continuation log-probs, greedy).

        Rows are right-padded: causal attention keeps padding out of every real token's view.
        """
        inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for ctx, cont in rows]
        width = max(len(x) for x in inputs)
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
        for i, x in enumerate(inputs):
            ids[i, : len(x)] = torch.tensor(x)
        logits = self.model(ids.to(self.device))  # (B, T, V)
        out = []
        for i, (x, (_, cont)) in enumerate(zip(inputs, rows, strict=True)):
            n = len(cont)
            logp = torch.log_softmax(logits[i, len(x) - n : len(x)].float(), dim=-1)  # (n, V)
            target = torch.tensor(cont, device=logp.device)
            picked = logp.gather(-1, target[:, None]).squeeze(-1)  # (n,)
            greedy = bool((logp.argmax(-1) == target).all())
            out.append((float(picked.double().sum()), greedy))
        return out

    def _batched(
        self, rows: list[tuple[list[int], list[int]]], score: Callable[..., list[Any]]
    ) -> list[Any]:
        """score() over rows in batches of similar length (longest first), in the input order."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]) - len(rows[i][1]))
        results: list[Any] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, value in zip(chunk, score([rows[i] for i in chunk]), strict=True):
                results[i] = value
        return results

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], **_: Any
    ) -> list[Scored]:
        rows = [(ctx, cont) for _, ctx, cont in requests]
        results = self._batched(rows, self._score_batch)
        for (key, _, _), value in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, value)
        return results

    def document_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """A document's scoring windows by the harness's rolling rule: every token predicted
        once, in windows of max_length tokens read from the prefix token on; the last, shorter
        window reads a full max_length of context."""
        windows = get_rolling_token_windows(
            token_list=self.tok_encode(text),
            prefix_token=self.prefix_token_id,
            max_seq_len=self.max_length,
            context_len=1,
        )
        return [make_disjoint_window(w) for w in windows]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, request in enumerate(requests):
            for w in self.document_windows(request.args[0]):
                windows.append(w)
                owner.append(i)
        scores = self._batched(windows, self._score_batch)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores, strict=True):
            totals[i] += logp
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generation -------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when asked) continuations, cut at the first `until` string."""
        results: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            groups: dict[str, list[int]] = {}  # rows with the same settings decode together
            for j, request in enumerate(chunk):
                groups.setdefault(repr(sorted(request.args[1].items())), []).append(j)
            texts: list[str] = [""] * len(chunk)
            for members in groups.values():
                kwargs = dict(chunk[members[0]].args[1])
                outs = self._generate([chunk[j].args[0] for j in members], kwargs)
                for j, text in zip(members, outs, strict=True):
                    texts[j] = text
            for request, text in zip(chunk, texts, strict=True):
                self.cache_hook.add_partial("generate_until", request.args, text)
            results += texts
        return results

    def _generate(self, contexts: list[str], kwargs: dict[str, Any]) -> list[str]:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        prompts = [self.tok_encode(c) for c in contexts]
        room = self.max_length - max(len(p) for p in prompts)
        wanted = int(kwargs.pop("max_gen_toks", 256))
        if room < 1:  # keep the prompt's end, as the harness's own models do
            prompts = [p[-(self.max_length - wanted) :] for p in prompts]
            room = wanted
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 1.0)) > 0
        cfg = GenerateConfig(
            max_new_tokens=max(1, min(wanted, room)),
            temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
            top_p=float(kwargs.get("top_p", 1.0)) if sample else 1.0,
            stop_strings=until,
        )
        pad = self.tokenizer.pad_token_id
        out = generate(
            self.model,  # type: ignore[arg-type]
            prompts,
            cfg,
            eos_ids=_stop_ids(self.tokenizer),
            pad_id=int(pad if pad is not None else self.eot_token_id),
            tokenizer=self.tokenizer,
        )
        texts = out.texts(self.tokenizer)
        return [_cut(t, until) for t in texts]


def _cut(text: str, until: Sequence[str]) -> str:
    """text up to the first of the stop strings."""
    ends = [text.find(s) for s in until if s and s in text]
    return text[: min(ends)] if ends else text
