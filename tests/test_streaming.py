"""Streams: framing, no buffering, broken upstream streams, and client disconnects."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from helpers import USER_MESSAGES, StartGateway, sse_data_lines

from gateway.testing.fake_upstream import Behaviour, FakeUpstream
from gateway.testing.harness import TestKeys

CHAT = "/v1/chat/completions"
STREAM_BODY: dict[str, Any] = {"model": "gpt-test", "messages": USER_MESSAGES, "stream": True}


async def read_until_broken(resp: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """Read a streamed body to its end; return it and whether the transfer broke."""
    out = b""
    try:
        async for piece in resp.content.iter_any():
            out += piece
    except aiohttp.ClientPayloadError:
        return out, True
    return out, False


def has_done(raw: bytes) -> bool:
    return any(d.startswith(b"[DONE]") for d in sse_data_lines(raw))


async def test_stream_headers_and_framing(
    gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    async with http.post(gateway + CHAT, json=STREAM_BODY, headers=auth) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        assert "Content-Length" not in resp.headers
        assert "Content-Encoding" not in resp.headers
        raw, broken = await read_until_broken(resp)
    assert not broken
    events = sse_data_lines(raw)
    assert events[-1] == b"[DONE]"
    assert events.count(b"[DONE]") == 1
    for data in events[:-1]:
        obj = orjson.loads(data)
        assert obj["object"] == "chat.completion.chunk"
    assert raw.endswith(b"data: [DONE]\n\n")


async def test_stream_is_not_buffered(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    # 6 events 0.15 s apart: the first content must arrive long before the upstream finishes
    fake.enqueue(Behaviour(stream_chunks=4, chunk_delay_s=0.15))
    started = time.monotonic()
    stream = await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES, stream=True)
    arrivals: list[float] = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 4
    assert arrivals[0] < 0.45, arrivals
    assert arrivals[-1] - arrivals[0] > 0.3, arrivals


async def test_stream_multibyte_text_survives(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    text = "héllo wörld ✓ 🎉 日本語のテキスト — ok"
    fake.enqueue(Behaviour(content=text, stream_chunks=9))
    stream = await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES, stream=True)
    got = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert got == text


async def test_cut_stream_raises_in_sdk(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.enqueue(Behaviour(cut_after=2))
    stream = await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES, stream=True)
    got: list[Any] = []
    with pytest.raises(openai.APIError):  # APIConnectionError is an APIError too
        async for chunk in stream:
            got.append(chunk)
    assert len(got) <= 2
    assert not any(c.choices and c.choices[0].finish_reason for c in got)
    assert fake.last.cut


async def test_cut_stream_raw_has_error_event_and_no_done(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    fake.enqueue(Behaviour(cut_after=2))
    async with http.post(gateway + CHAT, json=STREAM_BODY, headers=auth) as resp:
        assert resp.status == 200
        raw, _broken = await read_until_broken(resp)
    assert b'data: {"error":' in raw, raw
    assert not has_done(raw), raw
    events = sse_data_lines(raw)
    err = orjson.loads(events[-1])["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    # the two chunks sent before the cut got through
    assert len(events) == 3, events


async def test_upstream_error_event_reaches_sdk(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.enqueue(Behaviour(error_after=3))
    stream = await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES, stream=True)
    got = 0
    with pytest.raises(openai.APIError):
        async for _ in stream:
            got += 1
    assert got == 3


async def test_upstream_error_event_raw_no_done(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    fake.enqueue(Behaviour(error_after=2))
    async with http.post(gateway + CHAT, json=STREAM_BODY, headers=auth) as resp:
        raw, _ = await read_until_broken(resp)
    assert b'data: {"error":' in raw
    assert not has_done(raw)


async def test_stalled_stream_times_out(
    fake: FakeUpstream, start_gateway: StartGateway, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    url = await start_gateway(providers={"up": {"timeouts": {"read_s": 0.3}}})
    fake.enqueue(Behaviour(hang_after=2))
    headers = {"Authorization": f"Bearer {keys.team_a}"}
    started = time.monotonic()
    async with http.post(url + CHAT, json=STREAM_BODY, headers=headers) as resp:
        assert resp.status == 200
        raw, _ = await read_until_broken(resp)
    assert time.monotonic() - started < 2.0
    assert b'data: {"error":' in raw
    assert not has_done(raw)
    rec = fake.last
    await rec.wait_finished(2.0)
    assert rec.cancelled  # the gateway let go of the stalled upstream


async def test_keepalive_comments_while_upstream_silent(
    fake: FakeUpstream, start_gateway: StartGateway, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    url = await start_gateway(server={"stream_keepalive_s": 0.1})
    fake.enqueue(Behaviour(stream_chunks=2, chunk_delay_s=0.45))
    headers = {"Authorization": f"Bearer {keys.team_a}"}
    async with http.post(url + CHAT, json=STREAM_BODY, headers=headers) as resp:
        raw, broken = await read_until_broken(resp)
    assert not broken
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    assert any(line.startswith(b":") for line in lines), raw
    assert sse_data_lines(raw)[-1] == b"[DONE]"
    # never invented data events
    assert all(
        d == b"[DONE]" or orjson.loads(d)["object"] == "chat.completion.chunk" for d in sse_data_lines(raw)
    )


# ---- client disconnects ----------------------------------------------------------------------


async def test_client_closes_stream_upstream_released(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.enqueue(Behaviour(stream_chunks=50, chunk_delay_s=0.05))
    stream = await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES, stream=True)
    async for _ in stream:
        break
    await stream.close()
    closed_at = time.monotonic()
    rec = fake.last
    await rec.wait_finished(2.0)
    assert rec.client_gone, rec
    assert rec.client_gone_at is not None
    assert rec.client_gone_at - closed_at < 0.1, rec.client_gone_at - closed_at
    assert rec.events_sent < 10 and not rec.done_sent


async def test_raw_client_closes_stream_upstream_released(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    fake.enqueue(Behaviour(stream_chunks=50, chunk_delay_s=0.05))
    resp = await http.post(gateway + CHAT, json=STREAM_BODY, headers=auth)
    assert resp.status == 200
    first = await resp.content.readline()
    assert first.startswith(b"data: ")
    resp.close()  # drops the connection
    closed_at = time.monotonic()
    rec = fake.last
    await rec.wait_finished(2.0)
    assert rec.client_gone_at is not None
    assert rec.client_gone_at - closed_at < 0.1


async def test_client_gives_up_non_streaming_upstream_cancelled(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    fake.enqueue(Behaviour(delay_s=5.0))
    payload = {"model": "gpt-test", "messages": USER_MESSAGES}
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(
            gateway + CHAT,
            json=payload,
            headers=auth,
            timeout=aiohttp.ClientTimeout(total=0.3),
        ) as resp:
            await resp.read()
    gave_up = time.monotonic()
    assert len(fake.requests) == 1
    rec = fake.last
    await rec.wait_finished(2.0)
    assert rec.cancelled
    assert rec.cancelled_at is not None
    assert rec.cancelled_at - gave_up < 0.1, rec.cancelled_at - gave_up


async def test_sdk_task_cancelled_non_streaming_upstream_cancelled(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    fake.enqueue(Behaviour(delay_s=5.0))
    task = asyncio.create_task(client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES))
    await fake.wait_for_requests(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gave_up = time.monotonic()
    rec = fake.last
    await rec.wait_finished(2.0)
    assert rec.cancelled
    assert rec.cancelled_at is not None and rec.cancelled_at - gave_up < 0.1


async def test_stream_without_done_is_reported_broken(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    # a clean EOF with no [DONE] is a truncated answer, not a finished one
    fake.enqueue(Behaviour(send_done=False))
    async with http.post(gateway + CHAT, json=STREAM_BODY, headers=auth) as resp:
        raw, _ = await read_until_broken(resp)
    assert not has_done(raw)
    assert b'data: {"error":' in raw


async def test_client_gives_up_before_stream_starts(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    fake.enqueue(Behaviour(delay_s=5.0))
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(
            gateway + CHAT,
            json=STREAM_BODY,
            headers=auth,
            timeout=aiohttp.ClientTimeout(total=0.3),
        ) as resp:
            await resp.read()
    gave_up = time.monotonic()
    rec = fake.last
    await rec.wait_finished(2.0)
    assert rec.cancelled and rec.cancelled_at is not None
    assert rec.cancelled_at - gave_up < 0.1


async def test_in_flight_gauge_back_to_zero_after_disconnects(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    fake.enqueue(Behaviour(stream_chunks=50, chunk_delay_s=0.05), Behaviour(delay_s=5.0))
    resp = await http.post(gateway + CHAT, json=STREAM_BODY, headers=auth)
    await resp.content.readline()
    resp.close()
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(
            gateway + CHAT,
            json={"model": "gpt-test", "messages": USER_MESSAGES},
            headers=auth,
            timeout=aiohttp.ClientTimeout(total=0.2),
        ):
            pass
    for rec in await fake.wait_for_requests(2):
        await rec.wait_finished(2.0)
    await asyncio.sleep(0.05)
    async with http.get(gateway + "/metrics") as m:
        text = await m.text()
    gauge = [ln for ln in text.splitlines() if ln.startswith("tollway_requests_in_flight ")]
    assert gauge and float(gauge[0].split()[1]) == 0.0, gauge


@pytest.mark.parametrize(
    "behaviour",
    [
        Behaviour(content="größe ✓ 🎉 日本語 — ok", write_size=3),
        Behaviour(content="größe ✓ 🎉 日本語 — ok", crlf=True),
        Behaviour(content="größe ✓ 🎉 日本語 — ok", crlf=True, write_size=5),
    ],
    ids=["split-writes", "crlf", "crlf-split"],
)
async def test_upstream_framing_variants(
    fake: FakeUpstream, client: openai.AsyncOpenAI, behaviour: Behaviour
) -> None:
    fake.enqueue(behaviour)
    stream = await client.chat.completions.create(
        model="gpt-test", messages=USER_MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == behaviour.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


async def test_split_writes_without_usage_still_stripped(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    fake.enqueue(Behaviour(write_size=4, crlf=True))
    stream = await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES, stream=True)
    chunks = [c async for c in stream]
    assert chunks and all(c.choices for c in chunks)


async def test_stream_cut_before_first_event_is_502(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    # nothing was sent to the client yet: a plain HTTP error is possible and better
    fake.enqueue(Behaviour(cut_after=0))
    with pytest.raises(openai.InternalServerError) as ei:
        await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES, stream=True)
    assert ei.value.status_code == 502


async def test_stream_silent_from_start_is_504(
    fake: FakeUpstream, start_gateway: StartGateway, keys: TestKeys
) -> None:
    url = await start_gateway(providers={"up": {"timeouts": {"read_s": 0.3}}})
    fake.enqueue(Behaviour(hang_after=0))
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=keys.team_a, max_retries=0) as c:
        with pytest.raises(openai.InternalServerError) as ei:
            await c.chat.completions.create(model="gpt-test", messages=USER_MESSAGES, stream=True)
    assert ei.value.status_code == 504
