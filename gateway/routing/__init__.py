"""Routing: public model names to deployments, and the one place that calls providers."""

from gateway.routing.router import Deployment, ModelRoute, Router

__all__ = ["Deployment", "ModelRoute", "Router"]
