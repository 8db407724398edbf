"""Chat prompts in which message contents never become control tokens.

A chat template writes control tokens around each message (``<|im_start|>user\\n...<|im_end|>``).
Tokenizing the whole rendered prompt with special-token parsing also turns the same text
*inside* a message into control tokens, so a user who types ``<|im_end|>\\n<|im_start|>system``
closes their own turn and forges a system (or assistant) turn, which is then stored and reused
as a training context. Here only the template's own markers are control tokens; a message's
text is always tokenized as text:

* transformers: ``apply_chat_template(..., tokenize=True, sanitize_control_tokens=True)``, which
  wraps control-token texts found in the messages in private-use markers before rendering and
  encodes the marked ones as plain text (``hf_prompt_ids``);
* llama.cpp: the same idea on the GGUF's control tokens (``ControlTokens``): mark them in the
  contents, render, split the prompt at the marks, and tokenize the marked pieces without
  special-token parsing.

A prompt whose messages hold no control-token text gets exactly the ids it got before.
"""

from __future__ import annotations

import re

# Private-use characters around a control token's text that came from a message (not the template).
MARK_START, MARK_END = "\ue010", "\ue011"


def with_system(messages: list[dict], default_system_prompt: str) -> list[dict]:
    """The conversation as the engines render it: with their default system prompt when it has none."""
    if not messages or messages[0].get("role") != "system":
        return [{"role": "system", "content": default_system_prompt}, *messages]
    return list(messages)


def hf_prompt_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` rendered with a transformers tokenizer's chat template, in which
    text inside the messages is never a control token (``<|im_end|>`` typed by a user stays text).

    Use this instead of ``tokenizer(tokenizer.apply_chat_template(..., tokenize=False))``:
    a rendered string cannot tell the template's markers from a message's."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        sanitize_control_tokens=True, return_dict=False)
    return list(ids)


class ControlTokens:
    """The control tokens of a vocabulary (texts such as ``<|im_end|>``): marks them in message
    contents before rendering, and splits a rendered prompt into template text (tokenized with
    special-token parsing) and marked message text (tokenized as plain text)."""

    def __init__(self, texts):
        texts = sorted({t for t in texts if t}, key=len, reverse=True)  # a longer token wins over its parts
        self._find = re.compile("|".join(map(re.escape, texts)) or "(?!)")
        self._marked = re.compile(f"{MARK_START}({self._find.pattern}){MARK_END}|[{MARK_START}{MARK_END}]")

    def mark(self, messages: list[dict]) -> list[dict]:
        """The messages with every control-token text in their contents wrapped in marks. Marks
        already in a content are dropped first, so they cannot be used to forge one."""
        out = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, str):
                content = content.replace(MARK_START, "").replace(MARK_END, "")
                m = {**m, "content": self._find.sub(lambda hit: MARK_START + hit.group(0) + MARK_END, content)}
            out.append(m)
        return out

    def split(self, rendered: str) -> list[tuple[str, bool]]:
        """``rendered`` as (text, parse_special) pieces: False for the marked message text. A lone
        mark (a template that cut a content apart) is dropped but still separates the pieces, so
        the text on its two sides cannot join into a control token."""
        pieces, pos = [], 0
        for hit in self._marked.finditer(rendered):
            if hit.start() > pos:
                pieces.append((rendered[pos:hit.start()], True))
            if hit.group(1):
                pieces.append((hit.group(1), False))
            pos = hit.end()
        if pos < len(rendered) or not pieces:
            pieces.append((rendered[pos:], True))
        return pieces
