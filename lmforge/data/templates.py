"""Chat templates: the model's own, or a named one, turned into the ids and loss mask a stage
trains on, the prompts it generates from and the ids that stop generation.

A model keeps its identity: every chat stage renders chats with `tokenizer.apply_chat_template`
and the tokenizer's own template (lmforge's is one case among others), and saves that tokenizer.
`data.chat_template` gives a tokenizer without a template one (a Jinja file or a name in
`NAMED_TEMPLATES`), or replaces its own; the chosen one is then saved with it.

The assistant-only loss mask is found for any template:

* a template with `{% generation %}` ... `{% endgeneration %}` around each assistant turn's part
  gives it directly (transformers' `return_assistant_tokens_mask`);
* otherwise the conversation is rendered a prefix at a time: the text an assistant turn adds is
  render(messages[:k + 1]) minus render(messages[:k], add_generation_prompt=True), and the turn
  is learned up to and including the last special token in it (its end-of-turn token; what the
  template writes after that, such as a newline, is not learned). This needs each earlier turn to
  render the same once later turns follow; a template that rewrites them (e.g. one that drops the
  reasoning of earlier turns) is a one-line error asking for markers or another template.

Either way a token is learned when its characters overlap the learned text, so a token that
straddles the header and the content counts as content (transformers' rule too). Ids are exactly
`apply_chat_template`'s: the rendered text encoded without added special tokens, so a template that
writes BOS itself gets one BOS.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerFast

from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import CHAT_TEMPLATE, fallback_pad_token

KEY = "data.chat_template"

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] ~ '<|im_end|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- message['content'] ~ '<|im_end|>' -}}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] | trim ~ '<|eot_id|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- message['content'] | trim ~ '<|eot_id|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)
# name -> (template, the tokens it writes, which the tokenizer must have as single tokens)
NAMED_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "lmforge": (CHAT_TEMPLATE, ("<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    "chatml": (CHATML_TEMPLATE, ("<|im_start|>", "<|im_end|>")),
    "llama3": (LLAMA3_TEMPLATE, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
}
_GENERATION_TAG = re.compile(r"\{%[-+]?\s*generation\s*[-+]?%\}")
_PROBE = "lmforge probe answer 7"  # an answer text no template writes by itself


def _names() -> str:
    return ", ".join(NAMED_TEMPLATES)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_template_value(value: str, key: str = KEY) -> None:
    """Raise ConfigError unless value is empty, a named template or an existing file."""
    if value and value not in NAMED_TEMPLATES and not Path(value).expanduser().is_file():
        raise ConfigError(
            f"{key}: '{value}' is neither a named template ({_names()}) nor an existing Jinja file"
        )


def resolve_template(value: str, key: str = KEY) -> str:
    """The Jinja source of a named template or of a template file."""
    check_template_value(value, key)
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value][0]
    path = Path(value).expanduser()
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}: cannot read {path} ({_first_line(err)})") from err
    if not source.strip():
        raise ConfigError(f"{key}: {path} is empty; write the Jinja chat template into it")
    return source


def template_of(tokenizer: PreTrainedTokenizerFast, key: str = KEY) -> str:
    """The tokenizer's chat template (its default one when it has several), or a ConfigError
    naming `key` when it has none."""
    template = tokenizer.chat_template
    if isinstance(template, Mapping):
        template = template.get("default")
    if not isinstance(template, str) or not template.strip():
        raise ConfigError(
            f"tokenizer {tokenizer.name_or_path or '(in memory)'} has no chat template: set {key} "
            f"to a Jinja file or to one of {_names()}"
        )
    return template


def has_generation_markers(template: str) -> bool:
    """Whether the template marks the assistant's tokens with {% generation %}."""
    return bool(_GENERATION_TAG.search(template))


def pad_token_id(tokenizer: PreTrainedTokenizerFast) -> int:
    """The id that pads rows: the pad token's, else `fallback_pad_token`'s (an existing token)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.convert_tokens_to_ids(fallback_pad_token(tokenizer)))


def use_chat_template(
    tokenizer: PreTrainedTokenizerFast, value: str = "", key: str = KEY
) -> PreTrainedTokenizerFast:
    """Make `tokenizer` the one a chat stage trains with and saves, in place, and return it.

    With `value` (a name or a Jinja file) its template becomes that one; a named template's
    tokens must each be one token of the tokenizer. Without it the tokenizer's own template is
    kept, and a tokenizer without one is a ConfigError naming `key`. A missing pad token becomes
    an existing token (`fallback_pad_token`), so the model's vocabulary never changes. The
    template must render a short chat, or it is a ConfigError naming the template's error.
    """
    if value:
        template = resolve_template(value, key)
        for token in NAMED_TEMPLATES.get(value, ("", ()))[1]:
            if len(tokenizer.encode(token, add_special_tokens=False)) != 1:
                raise ConfigError(
                    f"{key}: template '{value}' writes {token}, which is not one token of "
                    f"tokenizer {tokenizer.name_or_path or '(in memory)'}; choose a template "
                    "written with this tokenizer's own special tokens, or a Jinja file"
                )
        tokenizer.chat_template = template
    template_of(tokenizer, key)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = fallback_pad_token(tokenizer)
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        ChatEncoder(tokenizer, key).encode(probe)
    except (DataError, ConfigError) as err:
        raise ConfigError(
            f"{key}: the chat template of tokenizer {tokenizer.name_or_path or '(in memory)'} "
            f"cannot render a user message and an answer: {err}"
        ) from None
    return tokenizer


class ChatEncoder:
    """A tokenizer's chat template, looked up once, encoding chats into (ids, assistant mask).

    `encode` gives exactly `apply_chat_template`'s ids and a mask that is 1 on the tokens an
    assistant turn learns (see the module docstring for how it is found).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, key: str = KEY) -> None:
        self.tokenizer = tokenizer
        self.key = key
        self.template = template_of(tokenizer, key)
        self.markers = has_generation_markers(self.template)
        self.name = tokenizer.name_or_path or "(in memory)"
        special = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.special_ids = frozenset(special)
        # Longest first, so that a token containing another is reported whole.
        literals = sorted(special.values(), key=len, reverse=True)
        self._special_text = re.compile("|".join(map(re.escape, literals))) if literals else None

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
        """The template's text for `messages` (possibly none: the start of a chat)."""
        try:
            if messages:
                return self.tokenizer.apply_chat_template(
                    list(messages),
                    chat_template=self.template,
                    add_generation_prompt=add_generation_prompt,
                    tokenize=False,
                )
            # Newer transformers refuse an empty chat in apply_chat_template (older ones render
            # it); the start of a chat that opens with the answer is rendered the same way.
            try:
                from transformers.utils.chat_template_utils import render_jinja_template
            except ImportError:
                return self.tokenizer.apply_chat_template(
                    [],
                    chat_template=self.template,
                    add_generation_prompt=add_generation_prompt,
                    tokenize=False,
                )
            texts, _ = render_jinja_template(
                conversations=[[]],
                chat_template=self.template,
                add_generation_prompt=add_generation_prompt,
                **self.tokenizer.special_tokens_map,
            )
            return texts[0]
        except TemplateError as err:
            raise self._refused(err) from None

    def _check_contents(self, messages: Sequence[Mapping[str, str]]) -> None:
        if self._special_text is None:
            return
        for j, message in enumerate(messages):
            found = self._special_text.search(message["content"])
            if found:
                raise DataError(
                    f"message {j} contains the special token {found.group()}, which would break "
                    "the chat format; remove it from the text"
                )

    def _refused(self, err: TemplateError) -> DataError:
        # The template's own raise_exception (unknown role, roles not alternating, ...).
        return DataError(
            f"the chat template of {self.name} refuses this chat ({_first_line(err)}); "
            f"fix the chat or set {self.key} to another template"
        )

    def _rewritten(self, j: int) -> ConfigError:
        return ConfigError(
            f"the chat template of {self.name} renders assistant message {j} differently once "
            "later messages follow, so its tokens to learn cannot be found; add {% generation %} "
            f"markers around the assistant's part of the template, or set {self.key} to a "
            "template that renders each turn once"
        )

    def encode(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        add_generation_prompt: bool = False,
        last_turn_only: bool = False,
    ) -> tuple[list[int], list[int]]:
        """(ids, mask) of a chat: the ids `apply_chat_template` gives and 1 on the tokens that its
        assistant turns learn (only the last turn's with `last_turn_only`)."""
        self._check_contents(messages)
        gen = add_generation_prompt
        turns = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
        if self.markers:
            try:
                out = self.tokenizer.apply_chat_template(
                    list(messages),
                    chat_template=self.template,
                    add_generation_prompt=gen,
                    return_dict=True,
                    return_assistant_tokens_mask=True,
                    tokenizer_kwargs={"return_offsets_mapping": True},
                )
            except TemplateError as err:
                raise self._refused(err) from None
            ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
            if turns and not any(mask):
                raise ConfigError(
                    f"the chat template of {self.name} has {{% generation %}} markers, but they "
                    "mark no token of the assistant's messages; put them around each assistant "
                    f"turn's part, or set {self.key} to another template"
                )
            if last_turn_only and turns:
                before = self.render(messages[: turns[-1]], True)
                if not self.render(messages, gen).startswith(before):
                    raise self._rewritten(turns[-1])
                # Tokens that end inside the prompt belong to earlier turns.
                offsets = out["offset_mapping"]
                mask = [
                    m if end > len(before) else 0 for m, (_, end) in zip(mask, offsets, strict=True)
                ]
            return ids, mask

        full = self.render(messages, gen)
        encoded = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
        mask = [0] * len(ids)
        for j in turns[-1:] if last_turn_only else turns:
            before = self.render(messages[:j], True)
            upto = self.render(messages[: j + 1], False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise self._rewritten(j)
            start, stop = len(before), len(upto)
            # The turn is learned up to its end-of-turn token: its last special token.
            ends = [e for i, (s, e) in zip(ids, offsets, strict=True)
                    if i in self.special_ids and s >= start and e <= stop]  # fmt: skip
            stop = ends[-1] if ends else stop
            for k, (s, e) in enumerate(offsets):
                if e > start and s < stop:
                    mask[k] = 1
        return ids, mask

    def prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The ids of a prompt followed by the template's generation prompt, as
        `apply_chat_template(messages, add_generation_prompt=True)` gives them."""
        self._check_contents(messages)
        text = self.render(messages, True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn(tokenizer: PreTrainedTokenizerFast) -> tuple[list[int], list[int]]:
    """(end-of-turn ids, suffix ids) of the tokenizer's template: the first special token it
    writes after an assistant message's content (lmforge `<|end|>`, ChatML `<|im_end|>`, Llama 3
    `<|eot_id|>`), and the tokens it writes after that to close the turn (lmforge and ChatML: the
    newline; a generated answer that stops on the end-of-turn token needs them appended to read
    as the template renders it). ([], []) when the tokenizer has no template or writes no special
    token there. Kept on the tokenizer per template: generation asks for it at every rollout."""
    cached = getattr(tokenizer, "_lmforge_end_of_turn", None)
    if cached is not None and cached[0] == tokenizer.chat_template:
        return cached[1]
    found = _find_end_of_turn(tokenizer)
    tokenizer._lmforge_end_of_turn = (tokenizer.chat_template, found)
    return found


def _find_end_of_turn(tokenizer: PreTrainedTokenizerFast) -> tuple[list[int], list[int]]:
    """end_of_turn, computed: render a probe answer and read the tokens after it."""
    try:
        encoder = ChatEncoder(tokenizer)
        chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
        before = encoder.render(chat[:1], True)
        upto = encoder.render(chat, False)
    except (ConfigError, DataError):
        return [], []
    content_end = upto.rfind(_PROBE) + len(_PROBE)
    if content_end < len(_PROBE) or not upto.startswith(before):
        return [], []
    encoded = tokenizer(upto, add_special_tokens=False, return_offsets_mapping=True)
    after = [
        i for i, (s, _) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
        if s >= content_end
    ]  # fmt: skip
    first = next((k for k, i in enumerate(after) if i in encoder.special_ids), None)
    if first is None:
        return [], []
    return after[first : first + 1], after[first + 1 :]


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a generated answer, in order and without repeats: the `eos_token_id`s
    of the checkpoint's generation_config.json (kept by `load_tokenizer`), the tokenizer's EOS and
    the template's end-of-turn token. lmforge's own tokenizer gives [<|eos|>, <|end|>]."""
    ids = [*getattr(tokenizer, "generation_eos_ids", []), tokenizer.eos_token_id]
    if isinstance(tokenizer, PreTrainedTokenizerFast):
        ids += end_of_turn(tokenizer)[0]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))
