"""The prompt-token estimate behind budget reservations must not fall short for text outside
ASCII (a CJK character is often 1-2 tokens, an emoji 2-3)."""

from __future__ import annotations

from gateway.wire.tokens import estimate_prompt_tokens


def _est(text: str) -> int:
    return estimate_prompt_tokens({"messages": [{"role": "user", "content": text}]})


def test_ascii_is_about_three_characters_a_token() -> None:
    assert _est("x" * 300) == 100 + 4 + 3


def test_cjk_counts_at_least_one_and_a_half_tokens_a_character() -> None:
    assert _est("数" * 300) - 7 >= 450


def test_emoji_count_at_least_two_tokens_each() -> None:
    assert _est("😀" * 300) - 7 >= 600


def test_completions_prompt_and_embedding_input_are_weighted_too() -> None:
    assert estimate_prompt_tokens({"prompt": "数" * 300}) - 7 >= 450
    assert estimate_prompt_tokens({"input": ["数" * 150, "数" * 150]}) - 11 >= 450
