"""Anthropic ↔ OpenAI translation against recorded-style fixtures (tests/fixtures/anthropic)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.errors import BadGateway, InvalidRequest, UpstreamError
from gateway.providers.anthropic import translate
from gateway.providers.anthropic.stream import SSEDecoder, StreamTranslator

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "anthropic"
CREATED = 1_732_000_000


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def sse_bytes(expected: list[Any]) -> bytes:
    """The exact OpenAI SSE bytes for a list of chunk objects ("[DONE]" for the terminator)."""
    return b"".join(
        b"data: [DONE]\n\n" if e == "[DONE]" else b"data: " + orjson.dumps(e) + b"\n\n" for e in expected
    )


def translator(include_usage: bool = True) -> StreamTranslator:
    return StreamTranslator(
        provider="anth", model="claude-upstream", created=CREATED, include_usage=include_usage
    )


def to_anthropic(body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    kw.setdefault("default_max_tokens", 4096)
    return translate.to_anthropic_request(body, model="claude-x", **kw)


USER = [{"role": "user", "content": "Hi"}]


# ---- requests --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["request_plain", "request_tools"])
def test_request_fixtures_translate_exactly(name: str) -> None:
    src = load(f"{name}.openai.json")
    got = translate.to_anthropic_request(
        src, model=src["model"], default_max_tokens=4096, stream=src.get("stream") is True
    )
    assert got == load(f"{name}.anthropic.json")


def test_max_tokens_is_always_set() -> None:
    assert to_anthropic({"messages": USER})["max_tokens"] == 4096
    assert to_anthropic({"messages": USER}, default_max_tokens=77)["max_tokens"] == 77
    assert to_anthropic({"messages": USER, "max_tokens": 50})["max_tokens"] == 50
    assert to_anthropic({"messages": USER, "max_tokens": 50, "max_completion_tokens": 60})["max_tokens"] == 60


def test_sampling_parameters_follow_the_pinned_version() -> None:
    body = {"messages": USER, "temperature": 0.3, "top_p": 0.5, "top_k": 40}
    old = to_anthropic(body, anthropic_version="2023-06-01")
    assert (old["temperature"], old["top_p"], old["top_k"]) == (0.3, 0.5, 40)
    assert to_anthropic({"messages": USER, "temperature": 2})["temperature"] == 1.0
    new = to_anthropic(body, anthropic_version="2026-10-21")
    assert not {"temperature", "top_p", "top_k"} & set(new)


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        (None, None, None),
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        ("none", False, {"type": "none"}),
        ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
        (
            {"type": "function", "function": {"name": "f"}},
            False,
            {"type": "tool", "name": "f", "disable_parallel_tool_use": True},
        ),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        (None, True, None),
    ],
)
def test_tool_choice(choice: Any, parallel: bool | None, expected: dict[str, Any] | None) -> None:
    body: dict[str, Any] = {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    out = to_anthropic(body)
    assert out.get("tool_choice") == expected
    assert out["tools"] == [{"name": "f", "input_schema": {"type": "object", "properties": {}}}]


def test_tool_choice_without_tools_is_dropped() -> None:
    out = to_anthropic({"messages": USER, "tool_choice": "auto", "tools": []})
    assert "tools" not in out and "tool_choice" not in out


def test_response_format_becomes_a_system_instruction() -> None:
    out = to_anthropic(
        {
            "messages": [{"role": "system", "content": "Be nice."}, *USER],
            "response_format": {"type": "json_object"},
        }
    )
    assert out["system"][0] == {"type": "text", "text": "Be nice."}
    assert "single valid JSON object" in out["system"][1]["text"]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    out = to_anthropic(
        {
            "messages": USER,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "thing", "schema": schema, "strict": True},
            },
        }
    )
    assert out["system"].endswith('(named thing): {"type":"object","properties":{"a":{"type":"integer"}}}')
    assert "system" not in to_anthropic({"messages": USER, "response_format": {"type": "text"}})


def test_pdf_file_part_becomes_a_document() -> None:
    part = {
        "type": "file",
        "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="},
    }
    out = to_anthropic({"messages": [{"role": "user", "content": [part]}]})
    assert out["messages"][0]["content"] == [
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
            "title": "a.pdf",
        }
    ]


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"n": 2}, "n", "n > 1 is not supported for Anthropic models."),
        ({"logprobs": True}, "logprobs", "logprobs are not supported for Anthropic models."),
        ({"top_logprobs": 3}, "top_logprobs", None),
        ({"modalities": ["text", "audio"]}, "modalities", None),
        ({"functions": [{"name": "f"}]}, "functions", None),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0]", None),
        ({"messages": [{"role": "system", "content": "only system"}]}, "messages", None),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            "messages[0].content[0]",
            None,
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}
                ]
            },
            "messages[0].content[0].image_url.url",
            None,
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]},
            "messages[0].content[0]",
            None,
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "f", "arguments": '{"a": 1'},
                            }
                        ],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
            None,
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}
                        ],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
            None,
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", None),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0]", None),
        ({"stop": 5}, "stop", None),
    ],
)
def test_what_cannot_be_translated_is_a_400(body: dict[str, Any], param: str, message: str | None) -> None:
    with pytest.raises(InvalidRequest) as ei:
        to_anthropic({"messages": USER, **body})
    assert ei.value.status == 400 and ei.value.param == param
    if message is not None:
        assert ei.value.message == message


def test_invalid_tool_arguments_say_why() -> None:
    msgs = [
        *USER,
        {
            "role": "assistant",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}],
        },
    ]
    with pytest.raises(InvalidRequest) as ei:
        to_anthropic({"messages": msgs})
    assert ei.value.code == "invalid_tool_arguments"
    assert "not valid JSON" in ei.value.message


# ---- responses -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["plain", "tools"])
def test_response_fixtures_translate_exactly(name: str) -> None:
    got = translate.to_openai_response(
        load(f"{name}.response.json"), created=CREATED, model="unused", provider="anth"
    )
    assert got == load(f"{name}.expected.json")


def test_tool_only_response_has_null_content() -> None:
    msg = {
        "id": "msg_1",
        "model": "m",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 1, "output_tokens": 2},
    }
    out = translate.to_openai_response(msg, created=CREATED, model="m")
    message = out["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("something_new", "stop"),
        (None, "stop"),
    ],
)
def test_stop_reason_maps_to_finish_reason(stop_reason: str | None, finish: str) -> None:
    assert translate.finish_reason(stop_reason) == finish


def test_usage_counts_cache_reads_and_writes_as_prompt_tokens() -> None:
    u = translate.openai_usage(
        {
            "input_tokens": 20,
            "cache_creation_input_tokens": 3,
            "cache_read_input_tokens": 5,
            "output_tokens": 9,
        }
    )
    assert (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) == (28, 9, 37)
    assert u["prompt_tokens_details"]["cached_tokens"] == 5


def test_malformed_response_is_a_bad_gateway() -> None:
    with pytest.raises(BadGateway):
        translate.to_openai_response({"type": "message"}, created=CREATED, model="m")


# ---- errors ----------------------------------------------------------------------------------


ERRORS = load("errors.json")


@pytest.mark.parametrize("case", ERRORS, ids=[c["name"] for c in ERRORS])
def test_error_fixtures_translate_exactly(case: dict[str, Any]) -> None:
    raw = case["raw_body"].encode() if "raw_body" in case else orjson.dumps(case["body"])
    err = translate.upstream_error("anth", case["status"], raw, case["headers"])
    exp = case["expected"]
    assert err.status == exp["status"]
    assert orjson.loads(err.body()) == exp["body"]
    assert err.headers == exp["headers"]
    assert err.type == exp["body"]["error"]["type"]
    # A rejected gateway key (401/403 → 502 upstream_auth_failed) is not retried: the same key
    # will not work a moment later (another deployment may still be tried), as on OpenAI.
    auth_failed = exp["body"]["error"]["code"] == "upstream_auth_failed"
    assert err.retryable == (
        not auth_failed
        and (exp["status"] >= 500 or (exp["status"] == 429 and "x-should-retry" not in exp["headers"]))
    )
    if case["status"] in (401, 403):
        assert auth_failed and not err.retryable
    if exp["status"] < 500:
        assert isinstance(err, UpstreamError)


# ---- streams ---------------------------------------------------------------------------------


def run_stream(
    raw: bytes, pieces: int | None = None, include_usage: bool = True
) -> tuple[bytes, StreamTranslator]:
    tr = translator(include_usage)
    out = b""
    step = pieces or len(raw)
    for i in range(0, len(raw), step):
        out += tr.feed(raw[i : i + step])
    if tr.state != "failed":
        out += tr.end()
    return out, tr


@pytest.mark.parametrize("name", ["stream_text", "stream_tools", "stream_error"])
def test_stream_fixtures_translate_exactly(name: str) -> None:
    out, tr = run_stream((FIXTURES / f"{name}.sse").read_bytes())
    assert out == sse_bytes(load(f"{name}.expected.json"))
    if name == "stream_error":
        assert tr.state == "failed" and isinstance(tr.error, UpstreamError) and tr.error.status == 503
        assert b"[DONE]" not in out
        assert tr.end() == b""  # already failed: nothing more, no second error
    else:
        assert tr.state == "done"


@pytest.mark.parametrize("framing", ["lf", "crlf", "cr"])
@pytest.mark.parametrize("pieces", [1, 3, 7, 64])
def test_stream_parsing_survives_any_split_and_line_ending(framing: str, pieces: int) -> None:
    raw = (FIXTURES / "stream_tools.sse").read_bytes()
    if framing == "crlf":
        raw = raw.replace(b"\n", b"\r\n")
    elif framing == "cr":
        raw = raw.replace(b"\n", b"\r")
    out, tr = run_stream(raw, pieces)
    assert tr.state == "done"
    assert out == sse_bytes(load("stream_tools.expected.json"))


def test_sse_decoder_joins_multiline_data_and_skips_comments() -> None:
    d = SSEDecoder()
    raw = b': hello\r\nevent: message_delta\r\ndata: {"a":\r\ndata:  1}\r\nid: 7\r\n\r\ndata: x\n'
    events = [ev for b in raw for ev in d.feed(bytes([b]))]
    assert events == [("message_delta", b'{"a":\n 1}')]
    assert d.end() == [("message", b"x")]


def test_usage_is_replaced_not_added() -> None:
    tr = translator()
    raw = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","model":"m",'
        b'"usage":{"input_tokens":10,"cache_read_input_tokens":4,"output_tokens":1}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"max_tokens"},'
        b'"usage":{"input_tokens":10,"cache_read_input_tokens":4,"output_tokens":5}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{},"usage":{"output_tokens":7}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    events = [orjson.loads(line[6:]) for line in tr.feed(raw).split(b"\n\n") if line.startswith(b"data: {")]
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["prompt_tokens"] == 14
    assert events[-1]["usage"]["completion_tokens"] == 7
    assert events[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 4


def test_without_include_usage_there_is_no_usage_at_all() -> None:
    out, _ = run_stream((FIXTURES / "stream_text.sse").read_bytes(), include_usage=False)
    assert b'"usage"' not in out and b'"choices":[]' not in out
    assert out.endswith(b"data: [DONE]\n\n")


def test_usage_chunk_for_the_gateway_without_usage_fields_for_the_client() -> None:
    """The gateway asks for usage (its accounting) when the client did not: the final usage chunk
    is produced (the relay drops it for the client) but no chunk carries `"usage": null`."""
    raw = (FIXTURES / "stream_text.sse").read_bytes()
    tr = StreamTranslator(
        provider="anth", model="claude-upstream", created=CREATED, include_usage=False, usage_chunk=True
    )
    out = tr.feed(raw) + tr.end()
    events = [orjson.loads(x[6:]) for x in out.split(b"\n\n") if x.startswith(b"data: {")]
    assert all("usage" not in e for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] > 0
    assert out.endswith(b"data: [DONE]\n\n")


def test_started_waits_for_content_not_message_start_or_pings() -> None:
    """`started` is the time-to-first-byte mark: a content block (or the end of the message)."""
    tr = translator()
    tr.feed(
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","model":"m",'
        b'"usage":{"input_tokens":1}}}\n\n' + b'event: ping\ndata: {"type":"ping"}\n\n' * 3
    )
    assert tr.chunks == 1 and not tr.started  # the role chunk only
    tr.feed(
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"thinking","thinking":""}}\n\n'
    )
    assert tr.started  # thinking is output too, even though it produces no OpenAI chunk
    assert tr.chunks == 1


def test_tool_call_without_arguments_gets_an_empty_object() -> None:
    raw = (
        b'event: message_start\ndata: {"type":"message_start",'
        b'"message":{"id":"msg_1","model":"m","usage":{}}}\n\n'
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"tool_use","id":"toolu_1","name":"now","input":{}}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"input_json_delta","partial_json":""}}\n\n'
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    )
    tr = translator()
    chunks = [orjson.loads(x[6:]) for x in tr.feed(raw).split(b"\n\n") if x]
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[1:]]
    assert calls == [
        {"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "now", "arguments": ""}},
        {"index": 0, "function": {"arguments": "{}"}},
    ]


def test_eof_before_message_stop_raises() -> None:
    raw = (FIXTURES / "stream_text.sse").read_bytes()
    cut = raw[: raw.index(b"event: message_delta")]
    tr = translator()
    assert tr.feed(cut)
    with pytest.raises(BadGateway) as ei:
        tr.end()
    assert ei.value.code == "upstream_stream_incomplete"
    assert b"[DONE]" not in tr.feed(b"")


def test_error_before_any_output_is_reported_without_chunks() -> None:
    tr = translator()
    out = tr.feed(
        b'event: error\ndata: {"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}\n\n'
    )
    assert tr.chunks == 0 and tr.state == "failed"
    assert isinstance(tr.error, UpstreamError) and tr.error.status == 429
    assert orjson.loads(out[6:])["error"]["code"] == "rate_limit_exceeded"


def test_invalid_json_event_fails_the_stream() -> None:
    tr = translator()
    out = tr.feed(b"event: message_start\ndata: {not json\n\n")
    assert tr.state == "failed" and b'"error"' in out and b"[DONE]" not in out


def test_events_after_the_end_are_ignored() -> None:
    raw = (FIXTURES / "stream_text.sse").read_bytes()
    tr = translator()
    tr.feed(raw)
    assert (
        tr.feed(b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"x"}}\n\n') == b""
    )
    assert tr.end() == b""
