"""Per-request metrics updated on the event loop without locks, exposed through prometheus_client.

prometheus_client's Counter/Gauge/Histogram take a mutex on every update (they may be updated
from any thread). The per-request metrics are only ever updated on the event loop thread and
read by `/metrics`, which is served on that same thread, so the lock buys nothing there and
costs about a microsecond per update: a request updates a dozen of them. These classes keep
plain Python numbers and are registered as a custom collector (prometheus_client's documented
extension point), so exposition, names and types stay exactly those of the library's own
metrics (`_total` for counters, cumulative `le` buckets, `_count` and `_sum` for histograms).

Use them only from the event loop thread. Metrics updated from worker threads (the semantic
cache's embedder) keep prometheus_client's own classes.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_le: Callable[[float], str] = floatToGoString  # the library's own `le` formatting (untyped)


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


class GaugeChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # `le` buckets: the first bound >= value (bisect_left) counts it.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


C = TypeVar("C", CounterChild, GaugeChild, HistogramChild)


class _Family(Collector, Generic[C]):
    """One metric family: its children by label values."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry | None
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], C] = {}
        if not self.labelnames:
            self.labels()  # an unlabelled metric is exposed from the start, as the library does
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> C:
        c = self._children.get(values)
        if c is None:
            c = self._add(values)
        return c

    def _add(self, values: tuple[str, ...]) -> C:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        key = tuple(v if isinstance(v, str) else str(v) for v in values)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = self._child()
        return c

    def _child(self) -> C:
        raise NotImplementedError

    def describe(self) -> list[Metric]:
        return [self._family()]

    def _family(self) -> Metric:
        raise NotImplementedError


class LoopCounter(_Family[CounterChild]):
    def _child(self) -> CounterChild:
        return CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        fam = self._family()
        for key, c in list(self._children.items()):
            fam.add_metric(list(key), c.value)
        yield fam


class LoopGauge(_Family[GaugeChild]):
    def _child(self) -> GaugeChild:
        return GaugeChild()

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        fam = self._family()
        for key, c in list(self._children.items()):
            fam.add_metric(list(key), c.value)
        yield fam


class LoopHistogram(_Family[HistogramChild]):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None,
        buckets: Sequence[float],
    ) -> None:
        bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be increasing")
        self.bounds = bounds
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        fam = self._family()
        les = [_le(b) for b in self.bounds] + ["+Inf"]
        for key, c in list(self._children.items()):
            acc = 0
            buckets: list[tuple[str, float]] = []
            for le, n in zip(les, c.counts, strict=True):
                acc += n
                buckets.append((le, float(acc)))
            fam.add_metric(list(key), buckets, c.sum)
        yield fam
