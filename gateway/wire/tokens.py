"""Token estimates from a request body, before the upstream has counted anything."""

from __future__ import annotations

from typing import Any


def _chars(s: str) -> int:
    """Characters, weighted so that text outside ASCII counts as more: about 3 ASCII characters
    make a token, but a CJK character is often 1-2 tokens and an emoji 2-3. Each UTF-8 byte past
    the first counts twice (CJK 5/3 tokens, emoji 7/3)."""
    if s.isascii():
        return len(s)
    return len(s) + 2 * (len(s.encode("utf-8", "surrogatepass")) - len(s))


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """A deliberately generous estimate (about 3 ASCII characters a token, more for other
    scripts) from the request body."""
    chars = 0
    items = 0
    msgs = body.get("messages")
    if isinstance(msgs, list):
        for m in msgs:
            items += 1
            if not isinstance(m, dict):
                continue
            c = m.get("content")
            if isinstance(c, str):
                chars += _chars(c)
            elif isinstance(c, list):
                for part in c:
                    if isinstance(part, dict):
                        t = part.get("text")
                        chars += _chars(t) if isinstance(t, str) else 255 * 3  # an image: ~255 tokens
            tc = m.get("tool_calls")
            if tc:
                chars += _chars(str(tc))
        tools = body.get("tools")
        if tools:
            chars += _chars(str(tools))
    else:
        src = body.get("prompt", body.get("input"))
        if isinstance(src, str):
            chars, items = _chars(src), 1
        elif isinstance(src, list):
            for s in src:
                items += 1
                chars += _chars(s) if isinstance(s, str) else (len(s) * 3 if isinstance(s, list) else 3)
    return chars // 3 + 4 * items + 3


def max_output_tokens(body: dict[str, Any]) -> int | None:
    """The client's output cap (`max_completion_tokens`, else `max_tokens`), if it gave one.

    0 is a cap: `/v1/completions` with `max_tokens: 0` (and `echo`) asks for the prompt's
    logprobs without generating anything (chat requests are validated to ask for at least 1)."""
    for k in ("max_completion_tokens", "max_tokens"):
        v = body.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v
    return None
