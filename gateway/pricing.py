"""Model prices (genai-prices, with config overrides) and the cost of a request in nano-USD."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from gateway.settings import ConfigError, PriceSettings, Settings

log = logging.getLogger("tollway.pricing")

_PROVIDER_IDS = {"openai": "openai", "azure": "azure", "anthropic": "anthropic"}


@dataclass(slots=True, frozen=True)
class Rate:
    """USD per million tokens, with optional tiers by prompt size: ((start_tokens, usd), …)."""

    base: float
    tiers: tuple[tuple[int, float], ...] = ()

    def at(self, prompt_tokens: int) -> float:
        price = self.base
        for start, p in self.tiers:
            if prompt_tokens >= start:
                price = p
        return price


@dataclass(slots=True, frozen=True)
class ModelPrice:
    input: Rate
    output: Rate
    cached_input: Rate
    source: str
    cache_write: Rate | None = None
    """Prompt tokens written to the provider's prompt cache (Anthropic: 1.25x input); None: the
    input price."""

    def cost_nano(
        self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, cache_write_tokens: int = 0
    ) -> int:
        """Cost in nano-USD; `prompt_tokens` includes the cached ones and the cache writes
        (OpenAI's convention, which the Anthropic translation follows)."""
        uncached = max(prompt_tokens - cached_tokens - cache_write_tokens, 0)
        # USD per MTok * tokens = micro-USD; * 1000 = nano-USD
        micro = (
            uncached * self.input.at(prompt_tokens)
            + cached_tokens * self.cached_input.at(prompt_tokens)
            + completion_tokens * self.output.at(prompt_tokens)
        )
        if cache_write_tokens:
            micro += cache_write_tokens * (self.cache_write or self.input).at(prompt_tokens)
        return round(micro * 1000)

    def reserve_nano(self, prompt_tokens: int, completion_tokens: int) -> int:
        """The worst case of a request of this size: every prompt token at the dearer of the
        input and cache-write prices."""
        if self.cache_write is not None and self.cache_write.at(prompt_tokens) > self.input.at(prompt_tokens):
            return self.cost_nano(prompt_tokens, completion_tokens, cache_write_tokens=prompt_tokens)
        return self.cost_nano(prompt_tokens, completion_tokens)


FREE = ModelPrice(Rate(0.0), Rate(0.0), Rate(0.0), source="free")


def _rate(v: Any) -> Rate | None:
    if v is None:
        return None
    if isinstance(v, Decimal | int | float):
        return Rate(float(v))
    base = getattr(v, "base", None)
    if base is None:
        return None
    tiers = tuple((int(t.start), float(t.price)) for t in getattr(v, "tiers", ()) or ())
    return Rate(float(base), tiers)


def lookup_genai_prices(model: str, provider_kind: str) -> ModelPrice | None:
    """The price genai-prices knows for `model` (None if it knows none)."""
    try:
        from genai_prices import Usage, calc_price
    except ImportError:  # pragma: no cover - a declared dependency
        return None
    provider_id = _PROVIDER_IDS.get(provider_kind)
    try:
        calc = calc_price(Usage(input_tokens=0, output_tokens=0), model_ref=model, provider_id=provider_id)
    except (LookupError, ValueError):
        if provider_id is None:
            return None
        try:
            calc = calc_price(Usage(input_tokens=0, output_tokens=0), model_ref=model)
        except (LookupError, ValueError):
            return None
    mp = calc.model_price
    inp = _rate(getattr(mp, "input_mtok", None))
    if inp is None:
        return None
    out = _rate(getattr(mp, "output_mtok", None)) or Rate(0.0)
    cached = _rate(getattr(mp, "cache_read_mtok", None)) or inp
    write = _rate(getattr(mp, "cache_write_mtok", None))
    return ModelPrice(
        inp, out, cached, source=f"genai-prices:{calc.provider.id}/{calc.model.id}", cache_write=write
    )


def _from_settings(p: PriceSettings) -> ModelPrice:
    if p.free:
        return FREE
    inp = Rate(p.input_per_mtok or 0.0)
    cached = Rate(p.cached_input_per_mtok) if p.cached_input_per_mtok is not None else inp
    write = Rate(p.cache_write_per_mtok) if p.cache_write_per_mtok is not None else None
    return ModelPrice(inp, Rate(p.output_per_mtok or 0.0), cached, source="config", cache_write=write)


def build_price_table(settings: Settings) -> dict[str, ModelPrice]:
    """Price of every public model; a model with no price anywhere is a config error."""
    table: dict[str, ModelPrice] = {}
    missing: list[str] = []
    for name, m in settings.models.items():
        if m.price is not None:
            table[name] = _from_settings(m.price)
            continue
        found: ModelPrice | None = None
        for d in m.deployments:
            kind = settings.providers[d.provider].kind
            if kind == "mock":
                continue
            found = lookup_genai_prices(d.model, kind) or lookup_genai_prices(name, kind)
            if found is not None:
                break
        if found is None:
            missing.append(name)
        else:
            table[name] = found
    if missing:
        raise ConfigError(
            "models without a price: "
            + ", ".join(f"models.{n}" for n in missing)
            + " — add `price: {input_per_mtok: …, output_per_mtok: …}` or `price: {free: true}`"
        )
    return table
