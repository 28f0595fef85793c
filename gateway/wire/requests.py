"""Reading and checking OpenAI request bodies: parse once, reject bad input with a clear 400."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from gateway.pipeline.context import Endpoint

_JSON_TYPES = ("application/json", "")


def check_content_type(content_type: str) -> None:
    """aiohttp's parsed media type; empty when the client sent none (curl -d sends form)."""
    if content_type in _JSON_TYPES or content_type.endswith("+json"):
        return
    if content_type == "application/octet-stream":
        return  # what aiohttp reports for a body sent without any Content-Type
    raise UnsupportedMediaType(
        f"Unsupported Content-Type {content_type!r}: send the body as application/json."
    )


def check_length(content_length: int | None, limit: int) -> None:
    if content_length is not None and content_length > limit:
        raise PayloadTooLarge(
            f"Request body is {content_length} bytes; the limit is {limit} bytes."
        )


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {e}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return body


def _type_error(param: str, expected: str) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}.", param=param, code="invalid_type"
    )


def _check_int(body: dict[str, Any], param: str, lo: int) -> None:
    v = body.get(param)
    if v is None:
        return
    if not isinstance(v, int) or isinstance(v, bool):
        raise _type_error(param, "an integer")
    if v < lo:
        raise InvalidRequest(
            f"Invalid '{param}': must be at least {lo}.", param=param, code="invalid_value"
        )


def validate(endpoint: Endpoint, body: dict[str, Any]) -> str:
    """Check what the gateway relies on (unknown fields pass through); return the model."""
    model = body.get("model")
    if model is None or model == "":
        raise InvalidRequest("You must provide a model parameter.", param="model", code="missing")
    if not isinstance(model, str):
        raise _type_error("model", "a string")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _type_error("stream", "a boolean")
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise _type_error("stream_options", "an object")
        if not stream:
            raise InvalidRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
                code="invalid_value",
            )
    if endpoint == "chat":
        msgs = body.get("messages")
        if msgs is None:
            raise InvalidRequest(
                "Missing required parameter: 'messages'.", param="messages", code="missing"
            )
        if not isinstance(msgs, list):
            raise _type_error("messages", "an array")
        if not msgs:
            raise InvalidRequest(
                "Invalid 'messages': empty array. Expected an array with minimum length 1.",
                param="messages",
                code="empty_array",
            )
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise InvalidRequest(
                    f"Invalid 'messages[{i}]': expected an object with a string 'role'.",
                    param=f"messages[{i}]",
                    code="invalid_value",
                )
        _check_int(body, "n", 1)
        _check_int(body, "max_tokens", 1)
        _check_int(body, "max_completion_tokens", 1)
    elif endpoint == "completions":
        prompt = body.get("prompt")
        if prompt is None:
            raise InvalidRequest(
                "Missing required parameter: 'prompt'.", param="prompt", code="missing"
            )
        if not isinstance(prompt, str | list):
            raise _type_error("prompt", "a string or an array")
        _check_int(body, "n", 1)
        _check_int(body, "max_tokens", 0)
    elif endpoint == "embeddings":
        inp = body.get("input")
        if inp is None:
            raise InvalidRequest(
                "Missing required parameter: 'input'.", param="input", code="missing"
            )
        if not isinstance(inp, str | list) or inp == "" or inp == []:
            raise InvalidRequest(
                "Invalid 'input': expected a non-empty string or array.",
                param="input",
                code="invalid_value",
            )
        if isinstance(inp, list) and len(inp) > 2048:
            raise InvalidRequest(
                "Invalid 'input': at most 2048 items.", param="input", code="invalid_value"
            )
        fmt = body.get("encoding_format")
        if fmt is not None and fmt not in ("float", "base64"):
            raise InvalidRequest(
                "Invalid 'encoding_format': expected 'float' or 'base64'.",
                param="encoding_format",
                code="invalid_value",
            )
        if stream:
            raise InvalidRequest(
                "Embeddings cannot be streamed.", param="stream", code="invalid_value"
            )
    return model
