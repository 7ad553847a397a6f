"""`transformer serve`: the HTTP service (`server`) and the dynamic batcher its requests go through (`batcher`)."""

from .server import Batching, Limits, Runner, create_app, serve

__all__ = ["Batching", "Limits", "Runner", "create_app", "serve"]
