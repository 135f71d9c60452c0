"""balancer: an asyncio HTTP reverse-proxy load balancer that refuses to concentrate traffic."""

__version__ = "0.1.0"
