"""Evaluate a semantic-cache matcher on eval/semantic_pairs.jsonl.

A matcher is ``match(a_messages, b_messages) -> (hit: bool, similarity: float)``: would the cached
answer to conversation ``a`` be served for conversation ``b``?  The matcher built here follows the
cache's rules: everything except the last user message must be exactly equal, the last user messages
must pass ``gateway.cache.guards.compatible`` and their similarity must reach the threshold.  The
similarity is pluggable:

* ``--similarity lexical`` (default): token Jaccard, no model -- a baseline;
* ``--similarity embed``: cosine similarity from ``gateway.cache.embedder`` (imported lazily).

Usage::

    python eval/evaluate.py                       # lexical, threshold 0.5
    python eval/evaluate.py --threshold 0.3 --sweep
    python eval/evaluate.py --similarity embed --threshold 0.85
    python eval/evaluate.py --no-guards           # similarity alone, to see what the guards buy
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.cache.guards import compatible, normalise  # noqa: E402

Message = dict[str, Any]
Similarity = Callable[[str, str], float]
Matcher = Callable[[Sequence[Message], Sequence[Message]], tuple[bool, float]]

PAIRS = Path(__file__).with_name("semantic_pairs.jsonl")
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def message_text(message: Message) -> str:
    """Text of an OpenAI chat message (string content or a list of content parts)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def split_last_user(messages: Sequence[Message]) -> tuple[list[Message], str] | None:
    """(everything before the last message, last message text) when the last message is the user's."""
    if not messages or messages[-1].get("role") != "user":
        return None
    return list(messages[:-1]), message_text(messages[-1])


def jaccard(a: str, b: str) -> float:
    """Token Jaccard similarity of the normalised, lower-cased texts."""
    ta = set(_TOKEN.findall(normalise(a).casefold()))
    tb = set(_TOKEN.findall(normalise(b).casefold()))
    if not ta and not tb:
        return 1.0
    return len(ta & tb) / len(ta | tb)


def embed_similarity(texts: Sequence[str] = ()) -> Similarity:
    """Cosine similarity from gateway.cache.embedder, imported only when asked for.

    Uses ``Embedder().load()`` + ``embed_sync(texts)`` (or a module-level ``similarity(a, b)`` /
    ``embed_texts(texts)`` if the module offers one); ``texts`` are embedded up front in one batch.
    """
    try:
        mod = importlib.import_module("gateway.cache.embedder")
    except Exception as exc:  # the embedder module or its dependencies may not be installed
        raise SystemExit(f"--similarity embed: cannot import gateway.cache.embedder ({exc!r})") from exc
    direct = getattr(mod, "similarity", None)
    if callable(direct):
        return lambda a, b: float(direct(a, b))
    embed_many: Callable[[Sequence[str]], Any] | None = None
    if hasattr(mod, "Embedder"):
        try:
            embedder = mod.Embedder()
            embedder.load()
        except Exception as exc:  # EmbedderUnavailable: model package / torch missing
            raise SystemExit(f"--similarity embed: the embedding model is unavailable ({exc!r})") from exc
        embed_many = embedder.embed_sync
    elif callable(getattr(mod, "embed_texts", None)):
        embed_many = mod.embed_texts
    if embed_many is None:
        raise SystemExit(
            "--similarity embed: gateway.cache.embedder has neither Embedder.embed_sync, "
            "similarity(a, b) nor embed_texts(texts)"
        )
    cache: dict[str, list[float]] = {}

    def warm(batch: Sequence[str]) -> None:
        todo = [t for t in dict.fromkeys(batch) if t not in cache]
        for i in range(0, len(todo), 256):
            chunk = todo[i : i + 256]
            for t, v in zip(chunk, embed_many(chunk), strict=True):
                cache[t] = [float(x) for x in v]

    warm(texts)

    def cosine(a: str, b: str) -> float:
        warm([a, b])
        va, vb = cache[a], cache[b]
        dot = sum(x * y for x, y in zip(va, vb, strict=True))
        na = sum(x * x for x in va) ** 0.5
        nb = sum(y * y for y in vb) ** 0.5
        return dot / (na * nb) if na and nb else 0.0

    return cosine


def make_matcher(similarity: Similarity, threshold: float, guards: bool = True) -> Matcher:
    """The semantic-cache decision: exact earlier turns, guards on the last user message, similarity."""

    def match(a: Sequence[Message], b: Sequence[Message]) -> tuple[bool, float]:
        sa, sb = split_last_user(a), split_last_user(b)
        if sa is None or sb is None or sa[0] != sb[0]:
            return False, 0.0
        ta, tb = sa[1], sb[1]
        if ta == tb:
            return True, 1.0
        sim = similarity(ta, tb)
        if guards and not compatible(ta, tb)[0]:
            return False, sim
        return sim >= threshold, sim

    return match


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    false_hits: list[str] = field(default_factory=list)

    def add(self, label: int, hit: bool, pair_id: str) -> None:
        if label and hit:
            self.tp += 1
        elif label:
            self.fn += 1
        elif hit:
            self.fp += 1
            self.false_hits.append(pair_id)
        else:
            self.tn += 1

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def positives(self) -> int:
        return self.tp + self.fn

    @property
    def negatives(self) -> int:
        return self.fp + self.tn

    @property
    def hits(self) -> int:
        return self.tp + self.fp

    @property
    def correct(self) -> int:
        return self.tp + self.tn

    def precision(self) -> float | None:
        return self.tp / self.hits if self.hits else None

    def recall(self) -> float | None:
        return self.tp / self.positives if self.positives else None

    def false_hit_rate(self) -> float | None:
        return self.fp / self.negatives if self.negatives else None


def load_pairs(path: Path = PAIRS) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluate(pairs: Sequence[dict[str, Any]], matcher: Matcher) -> tuple[Counts, dict[str, Counts]]:
    total = Counts()
    per_kind: dict[str, Counts] = {}
    for p in pairs:
        hit, _ = matcher(p["a"], p["b"])
        total.add(p["label"], hit, p["id"])
        per_kind.setdefault(p["kind"], Counts()).add(p["label"], hit, p["id"])
    return total, per_kind


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(total: Counts, per_kind: dict[str, Counts]) -> str:
    lines = [
        "| kind | pairs | label 1 | label 0 | TP | FP | TN | FN | precision | recall | false-hit rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = sorted(per_kind.items(), key=lambda kv: (kv[0] != "paraphrase", kv[0]))
    for kind, c in [*rows, ("**all**", total)]:
        lines.append(
            f"| {kind} | {c.n} | {c.tp + c.fn} | {c.fp + c.tn} | {c.tp} | {c.fp} | {c.tn} | {c.fn} | "
            f"{fmt(c.precision())} | {fmt(c.recall())} | {fmt(c.false_hit_rate())} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--pairs", type=Path, default=PAIRS)
    ap.add_argument("--similarity", choices=("lexical", "embed"), default="lexical")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--no-guards", action="store_true", help="similarity threshold only")
    ap.add_argument("--sweep", action="store_true", help="also print precision/recall over thresholds")
    ap.add_argument("--show-false-hits", action="store_true")
    args = ap.parse_args(argv)

    pairs = load_pairs(args.pairs)
    if args.similarity == "lexical":
        sim: Similarity = jaccard
    else:
        last = [message_text(p[side][-1]) for p in pairs for side in ("a", "b") if p[side]]
        sim = embed_similarity(last)
    matcher = make_matcher(sim, args.threshold, guards=not args.no_guards)
    total, per_kind = evaluate(pairs, matcher)
    guards = "off" if args.no_guards else "on"
    title = f"{args.similarity} similarity, threshold {args.threshold}, guards {guards}"
    print(f"### {title} ({len(pairs)} pairs)\n")
    print(table(total, per_kind))
    if args.show_false_hits and total.false_hits:
        by_id = {p["id"]: p for p in pairs}
        print("\nFalse hits:")
        for pid in total.false_hits:
            p = by_id[pid]
            print(f"- {pid}: {message_text(p['a'][-1])!r} vs {message_text(p['b'][-1])!r}")
    if args.sweep:
        print("\n| threshold | precision | recall | false-hit rate |\n|---:|---:|---:|---:|")
        for t in [x / 20 for x in range(2, 20)]:
            c, _ = evaluate(pairs, make_matcher(sim, t, guards=not args.no_guards))
            print(f"| {t:.2f} | {fmt(c.precision())} | {fmt(c.recall())} | {fmt(c.false_hit_rate())} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
