"""StreamRelay: byte-exact pass-through, event-boundary cuts, usage capture and stripping."""

from __future__ import annotations

import orjson
import pytest

from gateway.wire.sse import StreamRelay


def chunk(i: int, usage: object = None, choices: object = "default") -> bytes:
    obj = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": f"t{i}"}, "finish_reason": None}]
        if choices == "default"
        else choices,
        "usage": usage,
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
STREAM = chunk(0) + chunk(1) + chunk(2, usage=USAGE, choices=[]) + b"data: [DONE]\n\n"


def feed_all(relay: StreamRelay, data: bytes, step: int) -> bytes:
    out = b""
    for i in range(0, len(data), step):
        out += relay.feed(data[i : i + step])
    return out


@pytest.mark.parametrize("step", [1, 3, 7, 64, 10_000])
def test_passes_bytes_unchanged_when_client_wants_usage(step: int) -> None:
    relay = StreamRelay(strip_usage=False)
    assert feed_all(relay, STREAM, step) == STREAM
    assert relay.done
    assert relay.usage is not None and relay.usage.completion_tokens == 5


@pytest.mark.parametrize("step", [1, 5, 10_000])
def test_strips_usage_chunk_but_keeps_usage(step: int) -> None:
    relay = StreamRelay(strip_usage=True)
    out = feed_all(relay, STREAM, step)
    assert out == chunk(0) + chunk(1) + b"data: [DONE]\n\n"
    assert relay.usage is not None and relay.usage.prompt_tokens == 3


def test_partial_event_is_held_back() -> None:
    relay = StreamRelay(strip_usage=True)
    c0 = chunk(0)
    assert relay.feed(c0[:-1]) == b""
    assert relay.feed(c0[-1:]) == c0
    assert not relay.done
    assert relay.pending == b""


def test_crlf_framing_and_comments() -> None:
    data = b": keep-alive\r\n\r\n" + chunk(0).replace(b"\n\n", b"\r\n\r\n") + b"data: [DONE]\r\n\r\n"
    relay = StreamRelay(strip_usage=True)
    assert feed_all(relay, data, 4) == data
    assert relay.done


def test_usage_chunk_with_null_choices_is_stripped() -> None:
    relay = StreamRelay(strip_usage=True)
    out = relay.feed(chunk(0) + chunk(1, usage=USAGE, choices=None) + b"data: [DONE]\n\n")
    assert out == chunk(0) + b"data: [DONE]\n\n"
    assert relay.usage is not None


def test_upstream_error_event_is_noticed() -> None:
    relay = StreamRelay(strip_usage=True)
    err = b'data: {"error":{"message":"boom","type":"server_error","param":null,"code":null}}\n\n'
    assert relay.feed(chunk(0) + err) == chunk(0) + err
    assert relay.saw_error and not relay.done


def test_nothing_after_done() -> None:
    relay = StreamRelay(strip_usage=False)
    assert relay.feed(b"data: [DONE]\n\n" + chunk(9)) == b"data: [DONE]\n\n"
    assert relay.feed(chunk(10)) == b""


def test_rewrite_hook_sees_and_changes_chunks() -> None:
    def upper(c: dict[str, object]) -> dict[str, object] | None:
        choices = c.get("choices")
        assert isinstance(choices, list)
        if choices and choices[0]["delta"]["content"] == "t1":
            return None
        for ch in choices:
            ch["delta"]["content"] = ch["delta"]["content"].upper()
        return c

    relay = StreamRelay(strip_usage=True, rewrite=upper)
    out = relay.feed(chunk(0) + chunk(1) + b"data: [DONE]\n\n")
    assert b'"T0"' in out and b"t1" not in out and out.endswith(b"data: [DONE]\n\n")
