"""The plugin pipeline: request context, plugin protocol and the runner that calls the hooks."""

from gateway.pipeline.context import Principal, RequestContext, Usage
from gateway.pipeline.plugin import Plugin, ShortCircuit
from gateway.pipeline.runner import Pipeline

__all__ = ["Pipeline", "Plugin", "Principal", "RequestContext", "ShortCircuit", "Usage"]
