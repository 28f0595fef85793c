"""Exact-cache keys and the model's default output cap: a request without a cap is the question
the gateway sends upstream with `max_tokens` = the model's `max_output_tokens`."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.cache.keys import cache_key
from gateway.wire.tokens import max_output_tokens

BODY: dict[str, Any] = {
    "model": "x", "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "temperature": 0,
}


def key(body: dict[str, Any], default_cap: int | None) -> str:
    return cache_key("team-a", "gpt-test", "chat", body, default_cap)


def test_no_cap_and_the_default_cap_share_a_key() -> None:
    assert key(BODY, 4096) == key({**BODY, "max_tokens": 4096}, 4096)
    assert key(BODY, 256) == key({**BODY, "max_tokens": 256}, 256)
    # streamed or not, still the same question
    assert key({**BODY, "stream": True}, 256) == key({**BODY, "max_tokens": 256}, 256)
    # a cap other than the default is another question
    assert key(BODY, 4096) != key({**BODY, "max_tokens": 4095}, 4096)
    assert key(BODY, 256) != key({**BODY, "max_tokens": 4096}, 256)


def test_a_different_default_cap_is_a_different_key() -> None:
    assert key(BODY, 4096) != key(BODY, 8192)
    assert key(BODY, 1) != key(BODY, 2)
    # a default cap counts: without one the key is the plain body's, as before
    assert key(BODY, None) == cache_key("team-a", "gpt-test", "chat", BODY)
    assert key(BODY, 4096) != key(BODY, None)


@pytest.mark.parametrize(
    "given",
    [{"max_tokens": 100}, {"max_completion_tokens": 100}, {"max_tokens": 100, "max_completion_tokens": 50},
     {"max_tokens": 0, "max_completion_tokens": 100}, {"max_tokens": 4096}],
    ids=["max_tokens", "max_completion_tokens", "both", "zero-max_tokens-and-mct", "equal-to-a-default"],
)
def test_a_cap_given_by_the_client_is_not_affected_by_the_default(given: dict[str, Any]) -> None:
    body = {**BODY, **given}
    assert max_output_tokens(body) is not None
    assert key(body, 256) == key(body, 4096) == key(body, 8192) == key(body, None)
    assert key(body, 256) != key(BODY, 256)


@pytest.mark.parametrize(
    "invalid", [-1, -4096, True, False, "100", "", 100.0, None, [100], {"n": 1}],
    ids=["minus-one", "minus-cap", "true", "false", "str", "empty-str", "float", "null", "list", "object"],
)
def test_an_invalid_max_tokens_is_treated_like_no_cap(invalid: Any) -> None:
    """Consistent with `max_output_tokens` (what the gateway reserves for and sends upstream):
    a max_tokens it does not take as a cap is replaced by the default cap."""
    body = {**BODY, "max_tokens": invalid}
    assert max_output_tokens(body) is None
    assert key(body, 256) == key(BODY, 256) == key({**BODY, "max_tokens": 256}, 256)
    assert key(body, 256) != key(body, 4096)


@pytest.mark.parametrize("invalid", [-1, True, "100"], ids=["minus-one", "true", "str"])
def test_an_invalid_max_completion_tokens_leaves_the_default_cap_in_force(invalid: Any) -> None:
    body = {**BODY, "max_completion_tokens": invalid}
    assert max_output_tokens(body) is None
    assert key(body, 256) != key(body, 4096)
    # a valid max_tokens next to it is the cap
    capped = {**body, "max_tokens": 100}
    assert max_output_tokens(capped) == 100
    assert key(capped, 256) == key(capped, 4096)


def test_max_tokens_zero_is_a_cap() -> None:
    """`/v1/completions` with `max_tokens: 0` (and `echo`) asks for no generated tokens: the
    default cap must neither replace it upstream nor in the key."""
    body = {**BODY, "max_tokens": 0}
    assert max_output_tokens(body) == 0
    assert key(body, 256) == key(body, 4096) == key(body, None)
    assert key(body, 256) != key(BODY, 256)
