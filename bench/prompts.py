"""Prompt texts for the semantic benches (no numpy here: the load generator imports this)."""

from __future__ import annotations

import random

SUBJECTS = [
    "a list in Python",
    "a string in JavaScript",
    "a binary tree",
    "the French revolution",
    "photosynthesis",
    "a mortgage",
    "the TCP handshake",
    "a sourdough starter",
    "black holes",
    "the Roman empire",
    "a Kubernetes pod",
    "compound interest",
    "the immune system",
    "a SQL join",
    "climate change",
]
TEMPLATES = [
    "Explain {s} to a ten year old.",
    "What is {s}?",
    "Give me three facts about {s}.",
    "How does {s} work?",
    "Write a short summary of {s}.",
    "What are common mistakes with {s}?",
    "Compare {s} with something similar.",
    "Why does {s} matter?",
]


def ticket_prompts(n: int, tag: str, seed: int = 0) -> list[str]:
    """`n` distinct prompts of the shapes above, each ending in ``(ticket <tag>-<i>)``: close in
    meaning to the seeded prompts of ``bench.semantic`` (so a lookup finds real neighbours above
    the similarity threshold) but with a number no other prompt has, so the semantic cache's
    number guard vetoes every such candidate: lookups run in full and miss."""
    rng = random.Random(seed)
    return [f"{rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS))} (ticket {tag}-{i})" for i in range(n)]
