"""Pure translation between OpenAI chat completions and the Anthropic Messages API (both ways).

Requests: an OpenAI chat body becomes a Messages body built from an allow-list, so no
OpenAI-only field ever reaches Anthropic (it rejects unknown fields). Decisions on fields
Anthropic has no equivalent for:

* rejected with a 400 (silently ignoring them would change the answer's meaning): `n > 1`,
  `logprobs: true` / `top_logprobs > 0`, audio (`modalities` with "audio", `audio`,
  `input_audio` parts), the legacy `functions` / `function_call` / `role: "function"`, non-function
  tools, `file` parts other than an inline PDF, images that are neither `data:` URIs nor http(s);
* best effort: `response_format` `json_object` / `json_schema` become a system instruction to
  answer with JSON only (with the schema); the output is not validated against it;
* dropped: `seed`, `presence_penalty`, `frequency_penalty`, `logit_bias`, `store`, `metadata`
  (OpenAI's stored-completion tags), `service_tier`, `prediction`, `reasoning_effort`,
  `web_search_options`, `stream_options` (usage is always in the Anthropic stream),
  `parallel_tool_calls: true` (the default), tool `strict`, message `name`, stop sequences that
  are only whitespace (Anthropic rejects them), and any other unknown field;
* mapped: `system`/`developer` (wherever they are, in order) → top-level `system`, `stop` → `stop_sequences`,
  `max_completion_tokens` → `max_tokens` (then `max_tokens`, then the provider's default),
  `temperature` clamped to [0, 1], `top_p`/`top_k` kept — all three dropped under
  `anthropic-version` 2026-10-21 or later, which rejects them — `user` → `metadata.user_id`.

Responses: text blocks concatenated, `tool_use` → `tool_calls` (same ids, `arguments` a JSON
string), `thinking` blocks dropped, `stop_reason` → `finish_reason`, usage with cache reads and
writes counted as prompt tokens. Errors: Anthropic statuses and error types → OpenAI ones.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final, TypeGuard

import orjson

from gateway.errors import BadGateway, GatewayError, InvalidRequest, UpstreamError

MESSAGES_PATH: Final = "/v1/messages"
PASSED_ERROR_HEADERS: Final = ("retry-after", "retry-after-ms")
SAMPLING_REJECTED_FROM: Final = "2026-10-21"
"""From this `anthropic-version` on, temperature/top_p/top_k are rejected (wire-format §8.1)."""

FINISH_REASONS: Final[Mapping[str, str]] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_IMAGE_TYPES: Final = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_DATA_URI: Final = re.compile(r"data:([\w.+-]+/[\w.+-]+)((?:;[^;,]*)*);base64,(.*)", re.DOTALL)
_BAD_ID_CHARS: Final = re.compile(r"[^A-Za-z0-9_-]")
_JSON_ONLY: Final = (
    "Respond with a single valid JSON object and nothing else: no Markdown code fences, "
    "no text before or after it."
)


# ---- requests: OpenAI → Anthropic ------------------------------------------------------------


def _bad(message: str, param: str | None, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def _unsupported(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="unsupported_parameter")


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def tool_id(raw: str) -> str:
    """Anthropic tool ids allow only letters, digits, `_` and `-`; the same id maps the same way
    in `tool_use` and `tool_result`, and ids Anthropic minted pass unchanged."""
    return _BAD_ID_CHARS.sub("_", raw)


def _reject_unsupported(body: Mapping[str, Any]) -> None:
    n = body.get("n")
    if _is_int(n) and n > 1:
        raise _unsupported("n > 1 is not supported for Anthropic models.", "n")
    if body.get("logprobs") is True:
        raise _unsupported("logprobs are not supported for Anthropic models.", "logprobs")
    top = body.get("top_logprobs")
    if _is_int(top) and top > 0:
        raise _unsupported("top_logprobs is not supported for Anthropic models.", "top_logprobs")
    modalities = body.get("modalities")
    if body.get("audio") is not None or (isinstance(modalities, list) and "audio" in modalities):
        raise _unsupported("Audio output is not supported for Anthropic models.", "modalities")
    for legacy in ("functions", "function_call"):
        if body.get(legacy) is not None:
            raise _unsupported(
                f"'{legacy}' is not supported for Anthropic models; use 'tools' and 'tool_choice'.",
                legacy,
            )


def _max_tokens(body: Mapping[str, Any], default: int) -> int:
    for k in ("max_completion_tokens", "max_tokens"):
        v = body.get(k)
        if v is None:
            continue
        if not _is_int(v) or v < 1:
            raise _bad(f"Invalid '{k}': expected a positive integer.", k)
        return int(v)
    return default


def _text_of_parts(content: Any, param: str) -> list[str]:
    """Texts of a system/developer message (a string or text parts); empty ones are skipped."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content] if content else []
    if not isinstance(content, list):
        raise _bad(f"Invalid '{param}.content': expected a string or an array of parts.", param)
    out: list[str] = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _bad(f"Invalid '{param}.content[{j}]': expected a text part.", f"{param}.content[{j}]")
        if part["text"]:
            out.append(part["text"])
    return out


def _data_uri(url: str, param: str) -> tuple[str, str]:
    m = _DATA_URI.fullmatch(url)
    if m is None:
        raise _bad(f"Invalid '{param}': data URIs must be base64-encoded (data:<type>;base64,…).", param)
    return m.group(1).lower(), m.group(3)


def _image_block(part: Mapping[str, Any], param: str) -> dict[str, Any]:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise _bad(f"Invalid '{param}.image_url': expected an object with a 'url'.", param)
    if url.startswith("data:"):
        media_type, data = _data_uri(url, f"{param}.image_url.url")
        if media_type not in _IMAGE_TYPES:
            raise _bad(
                f"Invalid '{param}.image_url.url': image type {media_type} is not supported "
                "(use jpeg, png, gif or webp).",
                f"{param}.image_url.url",
            )
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise _bad(
        f"Invalid '{param}.image_url.url': expected an http(s) URL or a base64 data URI.",
        f"{param}.image_url.url",
    )


def _file_block(part: Mapping[str, Any], param: str) -> dict[str, Any]:
    spec = part.get("file")
    data = spec.get("file_data") if isinstance(spec, dict) else None
    if not isinstance(data, str):
        raise _unsupported(
            "Only inline files (file_data) are supported for Anthropic models, not file ids.", param
        )
    media_type, payload = _data_uri(data, f"{param}.file.file_data")
    if media_type != "application/pdf":
        raise _unsupported(f"File type {media_type} is not supported for Anthropic models.", param)
    block: dict[str, Any] = {
        "type": "document",
        "source": {"type": "base64", "media_type": media_type, "data": payload},
    }
    name = spec.get("filename") if isinstance(spec, dict) else None
    if isinstance(name, str) and name:
        block["title"] = name
    return block


def _content_blocks(content: list[Any], param: str, *, role: str) -> list[dict[str, Any]]:
    """OpenAI content parts → Anthropic blocks (empty text parts dropped: Anthropic rejects them)."""
    out: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        p = f"{param}.content[{j}]"
        if not isinstance(part, dict):
            raise _bad(f"Invalid '{p}': expected an object.", p)
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"Invalid '{p}.text': expected a string.", p)
            if text:
                out.append({"type": "text", "text": text})
        elif kind == "refusal" and role == "assistant":
            text = part.get("refusal")
            if isinstance(text, str) and text:
                out.append({"type": "text", "text": text})
        elif kind == "image_url" and role != "assistant":
            out.append(_image_block(part, p))
        elif kind == "file" and role == "user":
            out.append(_file_block(part, p))
        elif kind == "input_audio":
            raise _unsupported("Audio input is not supported for Anthropic models.", p)
        else:
            raise _bad(f"Invalid '{p}.type': {kind!r} is not supported here.", p)
    return out


def _user_content(content: Any, param: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return _content_blocks(content, param, role="user")
    raise _bad(f"Invalid '{param}.content': expected a string or an array of parts.", param)


def _tool_use(call: Any, param: str) -> dict[str, Any]:
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        raise _bad(f"Invalid '{param}': expected a function tool call.", param)
    fn = call.get("function")
    cid = call.get("id")
    if not isinstance(cid, str) or not cid:
        raise _bad(f"Invalid '{param}.id': expected a non-empty string.", f"{param}.id")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise _bad(f"Invalid '{param}.function': expected an object with a 'name'.", f"{param}.function")
    args = fn.get("arguments")
    ap = f"{param}.function.arguments"
    if args is None or (isinstance(args, str) and not args.strip()):
        parsed: Any = {}
    elif isinstance(args, str):
        try:
            parsed = orjson.loads(args)
        except orjson.JSONDecodeError:
            raise _bad(
                f"Invalid '{ap}': not valid JSON, which Anthropic models need to replay a tool call.",
                ap,
                "invalid_tool_arguments",
            ) from None
    else:
        parsed = args
    if not isinstance(parsed, dict):
        raise _bad(f"Invalid '{ap}': expected a JSON object.", ap, "invalid_tool_arguments")
    return {"type": "tool_use", "id": tool_id(cid), "name": fn["name"], "input": parsed}


def _assistant_content(m: Mapping[str, Any], param: str) -> str | list[dict[str, Any]]:
    content = m.get("content")
    calls = m.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        raise _bad(f"Invalid '{param}.tool_calls': expected an array.", f"{param}.tool_calls")
    if not calls:
        if content is None or isinstance(content, str):
            return content or ""
    blocks: list[dict[str, Any]]
    if content is None or content == "":
        blocks = []
    elif isinstance(content, str):
        blocks = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        blocks = _content_blocks(content, param, role="assistant")
    else:
        raise _bad(f"Invalid '{param}.content': expected a string or an array of parts.", param)
    for k, call in enumerate(calls or ()):
        blocks.append(_tool_use(call, f"{param}.tool_calls[{k}]"))
    return blocks


def _tool_result(m: Mapping[str, Any], param: str) -> dict[str, Any]:
    cid = m.get("tool_call_id")
    if not isinstance(cid, str) or not cid:
        raise _bad(f"Missing '{param}.tool_call_id'.", f"{param}.tool_call_id", "missing")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_id(cid)}
    content = m.get("content")
    if isinstance(content, list):
        parts = _content_blocks(content, param, role="tool")
        if parts:
            block["content"] = parts
    elif isinstance(content, str):
        if content:
            block["content"] = content
    elif content is not None:
        raise _bad(f"Invalid '{param}.content': expected a string or an array of parts.", param)
    return block


def _messages(msgs: list[Any]) -> tuple[list[str], list[dict[str, Any]]]:
    system: list[str] = []
    out: list[dict[str, Any]] = []
    results_open = False
    """The last message in `out` is a user message made of tool results (from `tool` messages)."""
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"Invalid '{p}': expected an object.", p)
        role = m.get("role")
        if role in ("system", "developer"):
            system.extend(_text_of_parts(m.get("content"), p))
        elif role == "tool":
            block = _tool_result(m, p)
            if results_open:
                out[-1]["content"].append(block)
            else:
                out.append({"role": "user", "content": [block]})
                results_open = True
        elif role == "user":
            content = _user_content(m.get("content"), p)
            if results_open:
                # A user turn after tool results joins them: results first, as Anthropic requires.
                blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
                out[-1]["content"].extend(b for b in blocks if b.get("type") != "text" or b["text"])
            else:
                out.append({"role": "user", "content": content})
            results_open = False
        elif role == "assistant":
            content = _assistant_content(m, p)
            results_open = False
            if content:  # Anthropic rejects empty assistant turns
                out.append({"role": "assistant", "content": content})
        elif role == "function":
            raise _unsupported(
                "role 'function' is not supported for Anthropic models; use tools and role 'tool'.", p
            )
        else:
            raise _bad(f"Invalid '{p}.role': {role!r}.", f"{p}.role")
    if not out:
        raise _bad(
            "Anthropic models need at least one user or assistant message besides system messages.",
            "messages",
        )
    return system, out


def _response_format_instruction(rf: Any) -> str | None:
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return _JSON_ONLY
    if kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            return _JSON_ONLY
        name = spec.get("name") if isinstance(spec, dict) else None
        named = f" (named {name})" if isinstance(name, str) and name else ""
        return f"{_JSON_ONLY} It must conform to this JSON Schema{named}: {orjson.dumps(schema).decode()}"
    raise _bad("Invalid 'response_format.type'.", "response_format")


def _stop_sequences(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("Invalid 'stop': expected a string or an array of strings.", "stop")
    return [s for s in stop if s.strip()]


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _bad("Invalid 'tools': expected an array.", "tools")
    out: list[dict[str, Any]] = []
    for i, t in enumerate(tools):
        p = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise _unsupported("Only function tools are supported for Anthropic models.", p)
        fn = t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(f"Invalid '{p}.function': expected an object with a 'name'.", f"{p}.function")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        elif not isinstance(params, dict):
            raise _bad(f"Invalid '{p}.function.parameters': expected an object.", f"{p}.function.parameters")
        tool: dict[str, Any] = {"name": fn["name"]}
        desc = fn.get("description")
        if isinstance(desc, str) and desc:
            tool["description"] = desc
        tool["input_schema"] = params
        out.append(tool)
    return out


def _tool_choice(body: Mapping[str, Any]) -> dict[str, Any] | None:
    choice = body.get("tool_choice")
    result: dict[str, Any]
    if choice is None or choice == "auto":
        result = {"type": "auto"}
    elif choice == "required":
        result = {"type": "any"}
    elif choice == "none":
        return {"type": "none"}
    elif (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
        and isinstance(choice["function"].get("name"), str)
    ):
        result = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise _bad(
            "Invalid 'tool_choice': expected 'none', 'auto', 'required' or a named function.",
            "tool_choice",
        )
    if body.get("parallel_tool_calls") is False:
        result["disable_parallel_tool_use"] = True
    elif choice is None:
        return None  # Anthropic's default is auto
    return result


def to_anthropic_request(
    body: Mapping[str, Any],
    *,
    model: str,
    default_max_tokens: int,
    anthropic_version: str = "2023-06-01",
    stream: bool = False,
) -> dict[str, Any]:
    """The Messages API body for an OpenAI chat body (raises InvalidRequest for what cannot map)."""
    _reject_unsupported(body)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty array.", "messages")
    system, messages = _messages(msgs)
    instruction = _response_format_instruction(body.get("response_format"))
    if instruction is not None:
        system.append(instruction)
    out: dict[str, Any] = {"model": model, "max_tokens": _max_tokens(body, default_max_tokens)}
    if len(system) == 1:
        out["system"] = system[0]
    elif system:
        out["system"] = [{"type": "text", "text": s} for s in system]
    out["messages"] = messages
    stop = _stop_sequences(body.get("stop"))
    if stop:
        out["stop_sequences"] = stop
    if anthropic_version < SAMPLING_REJECTED_FROM:
        t = body.get("temperature")
        if t is not None:
            if not _is_number(t):
                raise _bad("Invalid 'temperature': expected a number.", "temperature")
            out["temperature"] = min(max(float(t), 0.0), 1.0)
        top_p = body.get("top_p")
        if top_p is not None:
            if not _is_number(top_p):
                raise _bad("Invalid 'top_p': expected a number.", "top_p")
            out["top_p"] = top_p
        top_k = body.get("top_k")
        if _is_int(top_k) and top_k > 0:
            out["top_k"] = top_k
    tools = _tools(body)
    if tools:
        out["tools"] = tools
        choice = _tool_choice(body)
        if choice is not None:
            out["tool_choice"] = choice
    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    if stream:
        out["stream"] = True
    return out


# ---- responses: Anthropic → OpenAI -----------------------------------------------------------


def finish_reason(stop_reason: Any) -> str:
    if isinstance(stop_reason, str):
        return FINISH_REASONS.get(stop_reason, "stop")
    return "stop"


def _count(v: Any) -> int:
    return v if _is_int(v) and v > 0 else 0


def cache_write_tokens(usage: Any) -> int:
    """Anthropic's `cache_creation_input_tokens` (billed at the cache-write price)."""
    return _count(usage.get("cache_creation_input_tokens")) if isinstance(usage, dict) else 0


def openai_usage(usage: Any) -> dict[str, Any]:
    """Anthropic usage → OpenAI usage: prompt tokens include cache reads and cache writes."""
    u = usage if isinstance(usage, dict) else {}
    cache_read = _count(u.get("cache_read_input_tokens"))
    prompt = _count(u.get("input_tokens")) + cache_read + _count(u.get("cache_creation_input_tokens"))
    completion = _count(u.get("output_tokens"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cache_read, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def completion_id(message_id: Any) -> str:
    """`msg_01ABC` → `chatcmpl-01ABC` (the same id in responses, chunks and our logs)."""
    if not isinstance(message_id, str) or not message_id:
        return "chatcmpl-anthropic"
    return "chatcmpl-" + message_id.removeprefix("msg_")


def invalid_reply(provider: str, why: str) -> GatewayError:
    return BadGateway(
        f"provider {provider} sent an answer the gateway cannot read ({why})",
        code="upstream_invalid_response",
    )


def to_openai_response(msg: Any, *, created: int, model: str, provider: str = "anthropic") -> dict[str, Any]:
    """A Messages API response → an OpenAI `chat.completion` (raises BadGateway if malformed)."""
    if not isinstance(msg, dict) or not isinstance(msg.get("content"), list):
        raise invalid_reply(provider, "no content array")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in msg["content"]:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use":
            calls.append(
                {
                    "id": str(block.get("id") or f"toolu_{len(calls)}"),
                    "type": "function",
                    "function": {
                        "name": str(block.get("name") or ""),
                        "arguments": orjson.dumps(block.get("input") or {}).decode(),
                    },
                }
            )
        # thinking, redacted_thinking and server-tool blocks have no OpenAI equivalent
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
        "annotations": [],
    }
    if calls:
        message["tool_calls"] = calls
    upstream_model = msg.get("model")
    return {
        "id": completion_id(msg.get("id")),
        "object": "chat.completion",
        "created": created,
        "model": upstream_model if isinstance(upstream_model, str) and upstream_model else model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason(msg.get("stop_reason")),
            }
        ],
        "usage": openai_usage(msg.get("usage")),
    }


# ---- errors ----------------------------------------------------------------------------------

_BY_TYPE: Final[Mapping[str, int]] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
_BILLING_HINTS: Final = ("credit balance", "spend limit", "billing")
_CONTEXT_HINTS: Final = ("prompt is too long", "exceed context limit", "context window")


def _error_parts(parsed: Any) -> tuple[str | None, str | None, Any]:
    """(error type, message, details) of an Anthropic error body or `error` event."""
    if not isinstance(parsed, dict):
        return None, None, None
    inner = parsed.get("error")
    if not isinstance(inner, dict):
        inner = parsed
    etype = inner.get("type") if isinstance(inner.get("type"), str) else None
    message = inner.get("message") if isinstance(inner.get("message"), str) else None
    return etype, message, inner.get("details")


def _openai_error(
    provider: str,
    status: int | None,
    etype: str | None,
    message: str | None,
    details: Any,
    headers: Mapping[str, str],
) -> GatewayError:
    if status is None:
        status = _BY_TYPE.get(etype or "", 500)
    code: str | None
    text = message or f"upstream returned HTTP {status}"
    low = text.lower()
    detail_code = details.get("error_code") if isinstance(details, dict) else None
    passed = {h.lower(): v for h, v in headers.items() if h.lower() in PASSED_ERROR_HEADERS}

    if status in (401, 403) or etype in ("authentication_error", "permission_error"):
        auth = BadGateway(
            f"provider {provider} rejected the gateway's credentials (HTTP {status}): {text}",
            code="upstream_auth_failed",
        )
        auth.retryable = False  # the same key will not work a moment later (other deployments may)
        return auth
    if (
        status == 402
        or etype == "billing_error"
        or detail_code == "enforced_spend_limit_reached"
        or (status in (400, 429) and any(h in low for h in _BILLING_HINTS))
    ):
        # The gateway's Anthropic account is out of credit: retrying will not help.
        out_status, out_type, code = 429, "insufficient_quota", "insufficient_quota"
        passed = {"x-should-retry": "false"}
        text = f"provider {provider} cannot serve requests: its account quota is exhausted ({text})"
    elif status == 429 or etype == "rate_limit_error":
        out_status, out_type, code = 429, "requests", "rate_limit_exceeded"
    elif status == 529 or etype == "overloaded_error":
        out_status, out_type, code = 503, "server_error", "upstream_overloaded"
        text = f"provider {provider} is overloaded ({text})"
    elif status == 504 or etype == "timeout_error":
        out_status, out_type, code = 504, "server_error", "upstream_timeout"
        text = f"provider {provider} timed out ({text})"
    elif status >= 500:
        out_status, out_type, code = 502, "server_error", "upstream_error"
        text = f"provider {provider} failed (HTTP {status}): {text}"
    elif status == 404:
        out_status, out_type, code = 404, "invalid_request_error", "not_found"
    elif status == 413:
        out_status, out_type, code = 413, "invalid_request_error", "request_too_large"
    else:
        out_status, out_type = status if 400 <= status < 500 else 400, "invalid_request_error"
        code = "context_length_exceeded" if any(h in low for h in _CONTEXT_HINTS) else None
    err = UpstreamError(
        text,
        status=out_status,
        raw_body=orjson.dumps({"error": {"message": text, "type": out_type, "param": None, "code": code}}),
        headers=passed,
        code=code,
    )
    err.type = out_type
    if out_type == "insufficient_quota":
        err.retryable = False
    return err


def upstream_error(provider: str, status: int, raw: bytes, headers: Mapping[str, str]) -> GatewayError:
    """An Anthropic error answer → the error the client gets, in the OpenAI envelope."""
    try:
        parsed: Any = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        parsed = None
    etype, message, details = _error_parts(parsed)
    if message is None and parsed is None and raw:
        snippet = raw[:200].decode("utf-8", "replace").strip()
        message = f"upstream returned HTTP {status}" + (f": {snippet}" if snippet else "")
    return _openai_error(provider, status, etype, message, details, headers)


def stream_error(provider: str, event: Any) -> GatewayError:
    """An Anthropic `error` stream event → the matching GatewayError (status from its type)."""
    etype, message, details = _error_parts(event)
    return _openai_error(provider, None, etype, message or "The upstream stream failed.", details, {})
