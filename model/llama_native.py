"""llama.cpp's C API below the engine: tokenizing, detokenizing, the GGUF's chat template, the
build check and the process-wide log filter. No scheduling here (that is model/llamacpp.py).

    python -c "from model.llama_native import uses_openmp; print(uses_openmp())"
"""

from __future__ import annotations

import ctypes
import functools
import os

from model.chat_prompt import ControlTokens


def lib():
    import llama_cpp

    return llama_cpp


def tokenize(vocab, text: str, special: bool = True) -> list[int]:
    """Token ids of ``text``; with ``special``, control-token texts such as <|im_start|> become
    those tokens (right for a template's own text only: see ``prompt_tokens``)."""
    ll = lib()
    data = text.encode()
    buf = (ll.llama_token * (len(data) + 8))()
    n = ll.llama_tokenize(vocab, data, len(data), buf, len(buf), False, special)
    if n < 0:
        raise ValueError("prompt could not be tokenized")
    return list(buf[:n])


def control_tokens(vocab) -> ControlTokens:
    """The vocabulary's control tokens: what special-token parsing turns text into."""
    ll = lib()
    kinds = ll.LLAMA_TOKEN_ATTR_CONTROL | ll.LLAMA_TOKEN_ATTR_UNKNOWN
    return ControlTokens(ll.llama_vocab_get_text(vocab, t).decode("utf-8", "replace")
                         for t in range(ll.llama_vocab_n_tokens(vocab)) if ll.llama_vocab_get_attr(vocab, t) & kinds)


def prompt_tokens(vocab, controls: ControlTokens, render, messages: list[dict]) -> list[int]:
    """Token ids of ``render(messages)`` in which message contents are never control tokens: the
    control-token texts in them are marked before rendering and tokenized as plain text."""
    pieces = controls.split(render(controls.mark(messages)))
    if len(pieces) == 1:  # nothing marked: one call, the ids a whole-prompt tokenize gives
        return tokenize(vocab, pieces[0][0])
    return [tok for text, special in pieces for tok in tokenize(vocab, text, special)]


def piece(vocab, tok: int) -> bytes:
    ll = lib()
    buf = ctypes.create_string_buffer(64)
    n = ll.llama_token_to_piece(vocab, tok, buf, len(buf), 0, False)
    if n < 0:  # a longer piece than the buffer: retry with the size llama.cpp asked for
        buf = ctypes.create_string_buffer(-n)
        n = ll.llama_token_to_piece(vocab, tok, buf, len(buf), 0, False)
    return buf.raw[:n]


def chat_template(model):
    """The GGUF's own chat template, rendered with Jinja2 in a sandbox (as transformers does)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    ll = lib()
    raw = ll.llama_model_chat_template(model, None)
    if not raw:
        raise RuntimeError("this GGUF has no chat template (tokenizer.chat_template); use a chat/instruct model")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(raw.decode())


@functools.cache
def uses_openmp() -> bool:
    """Whether this llama.cpp build runs its threads through OpenMP (ours should not)."""
    return b"OPENMP = 1" in lib().llama_print_system_info()


def warn_if_openmp() -> None:
    if uses_openmp():
        import logging

        logging.getLogger(__name__).warning(
            "llama.cpp was built with OpenMP: it shares libgomp with torch in this process and decodes "
            "about 2x slower. Rebuild it with `make setup` (it compiles llama-cpp-python with GGML_OPENMP=OFF).")


_LOG_CB = None


def quiet_logs() -> None:
    """llama.cpp prints every load detail to stderr; keep warnings and errors only."""
    global _LOG_CB
    ll = lib()
    if _LOG_CB is not None:
        return

    @ll.llama_log_callback
    def cb(level, text, user_data):
        # ggml levels: 3 = warning, 4 = error. Errors always; warnings when LLAMA_LOG is set.
        if level == 4 or (level == 3 and os.environ.get("LLAMA_LOG")):
            os.write(2, text)

    _LOG_CB = cb
    ll.llama_log_set(cb, ctypes.c_void_p(0))
