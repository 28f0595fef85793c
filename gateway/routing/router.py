"""Router: resolves a public model name and sends the call to one of its deployments."""

from __future__ import annotations

import random
import time
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate

from gateway.errors import InvalidRequest, ModelNotFound
from gateway.pipeline.context import Endpoint, RequestContext
from gateway.providers.base import Provider, Reply, UpstreamRequest, UpstreamStream
from gateway.settings import ModelSettings


@dataclass(slots=True, frozen=True)
class Deployment:
    name: str
    provider: Provider
    upstream_model: str
    weight: float


@dataclass(slots=True, frozen=True)
class ModelRoute:
    public_name: str
    deployments: tuple[Deployment, ...]
    endpoints: frozenset[str]
    owned_by: str
    created: int
    cum_weights: tuple[float, ...]


class Router:
    """The only component that talks to providers. (Retries and fallbacks will live here.)"""

    def __init__(self, models: dict[str, ModelSettings], providers: dict[str, Provider]) -> None:
        created = int(time.time())
        self.providers = providers
        self.routes: dict[str, ModelRoute] = {}
        for name, m in models.items():
            deps = tuple(
                Deployment(
                    name=f"{d.provider}/{d.model}",
                    provider=providers[d.provider],
                    upstream_model=d.model,
                    weight=d.weight,
                )
                for d in m.deployments
            )
            self.routes[name] = ModelRoute(
                public_name=name,
                deployments=deps,
                endpoints=frozenset(m.endpoints),
                owned_by=m.owned_by,
                created=created,
                cum_weights=tuple(accumulate(d.weight for d in deps)),
            )

    def resolve(self, model: str, endpoint: Endpoint) -> ModelRoute:
        route = self.routes.get(model)
        if route is None:
            raise ModelNotFound(
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model",
            )
        if endpoint not in route.endpoints:
            raise InvalidRequest(
                f"The model `{model}` does not support the {endpoint} endpoint.",
                param="model",
                code="model_not_supported",
            )
        return route

    def pick(self, route: ModelRoute) -> Deployment:
        deps = route.deployments
        if len(deps) == 1:
            return deps[0]
        x = random.random() * route.cum_weights[-1]
        return deps[min(bisect_right(route.cum_weights, x), len(deps) - 1)]

    def _request(self, ctx: RequestContext, dep: Deployment, stream: bool) -> UpstreamRequest:
        assert ctx.body is not None
        ctx.provider = dep.provider.name
        ctx.deployment = dep.name
        body = ctx.body
        body["model"] = dep.upstream_model
        return UpstreamRequest(
            endpoint=ctx.endpoint,
            body=body,
            upstream_model=dep.upstream_model,
            stream=stream,
            request_id=ctx.request_id,
        )

    async def complete(self, ctx: RequestContext, route: ModelRoute) -> Reply:
        dep = self.pick(route)
        return await dep.provider.complete(self._request(ctx, dep, False))

    async def open_stream(self, ctx: RequestContext, route: ModelRoute) -> UpstreamStream:
        dep = self.pick(route)
        return await dep.provider.open_stream(self._request(ctx, dep, True))
