"""The embedder's window check (`must_fit`): decided by length on the event loop when it can, else by
tokenizing in the worker thread within the batch, never on the loop; a text over the window is refused
with TextTooLong and never embedded."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import numpy as np
import pytest
from helpers import ThreadSpy

from gateway.cache.embedder import EMBEDDING_DIM, Embedder, TextTooLong

SHORT = "What is the capital of France?"
LONG_FITS = "word " * 200  # 1000 characters (over 254: length cannot tell), 202 word pieces
LONG_OVER = "word " * 300  # 1500 characters, 302 word pieces: over the 256 window
FAR_OVER = "x" * 30_000  # more than 256 x 101 characters: over by its length alone

_shared: Embedder | None = None


@pytest.fixture
async def embedder() -> AsyncIterator[Embedder]:
    global _shared
    if _shared is None:
        _shared = Embedder()
        _shared.load()
    e = Embedder(max_batch=64, window_s=0.005)
    e._model, e.max_seq_length = _shared._model, _shared.max_seq_length
    e._tokenizer = ThreadSpy(_shared._tokenizer)
    yield e
    await e.close()


def spy(e: Embedder) -> ThreadSpy:
    tok = e._tokenizer
    assert isinstance(tok, ThreadSpy)
    return tok


def test_quick_fit_decides_by_length_only_when_it_can(embedder: Embedder) -> None:
    assert embedder.quick_fit(SHORT) is True
    assert embedder.quick_fit(LONG_FITS) is None and embedder.quick_fit(LONG_OVER) is None
    assert embedder.quick_fit(FAR_OVER) is False
    assert spy(embedder).threads == []
    assert embedder.fits(LONG_FITS) and not embedder.fits(LONG_OVER)  # the blocking check still works


async def test_window_check_runs_in_the_worker_within_the_batch(embedder: Embedder) -> None:
    sizes: list[int] = []
    embedder.on_batch = lambda n, _s: sizes.append(n)
    rows_seen: list[int] = []

    def post(m: np.ndarray) -> list[int]:
        rows_seen.append(m.shape[0])
        return list(range(m.shape[0]))

    results = await asyncio.gather(
        embedder.embed_then(SHORT, "k", post, must_fit=True),
        embedder.embed_then(LONG_FITS, "k", post, must_fit=True),
        embedder.embed_then(LONG_OVER, "k", post, must_fit=True),
        return_exceptions=True,
    )
    short, fits, over = results
    assert isinstance(over, TextTooLong)
    assert not isinstance(short, BaseException) and not isinstance(fits, BaseException)
    assert short[0].shape == fits[0].shape == (EMBEDDING_DIM,)
    assert (short[1], fits[1]) == (0, 1)
    # one model call for the two that fit, one post call on their two rows
    assert embedder.model_calls == 1 and sizes == [2] and rows_seen == [2]
    # the two long texts were tokenized, in the worker thread; the short one was not tokenized at all
    threads = spy(embedder).threads
    assert len(threads) == 2
    assert all(t.name.startswith("tollway-embed") for t in threads), threads
    assert threading.main_thread() not in threads


async def test_over_the_window_by_length_fails_on_the_loop_without_a_hop(embedder: Embedder) -> None:
    called: list[int] = []
    with pytest.raises(TextTooLong):
        await embedder.embed_then(FAR_OVER, "k", lambda m: called.append(1) or [None], must_fit=True)
    with pytest.raises(TextTooLong):
        await embedder.embed_one(FAR_OVER, must_fit=True)
    assert embedder.model_calls == 0 and called == [] and spy(embedder).threads == []


async def test_embed_one_must_fit(embedder: Embedder) -> None:
    sizes: list[int] = []
    embedder.on_batch = lambda n, _s: sizes.append(n)
    with pytest.raises(TextTooLong):
        await embedder.embed_one(LONG_OVER, must_fit=True)
    assert embedder.model_calls == 0 and sizes == []  # nothing was embedded: no model call
    v = await embedder.embed_one(LONG_FITS, must_fit=True)
    assert v.shape == (EMBEDDING_DIM,) and sizes == [1]
    assert all(t.name.startswith("tollway-embed") for t in spy(embedder).threads)
    # without must_fit, a long text is embedded (truncated by the model), never tokenized apart
    n = len(spy(embedder).threads)
    assert (await embedder.embed_one(LONG_OVER)).shape == (EMBEDDING_DIM,)
    assert len(spy(embedder).threads) == n
