"""What parsing needs from the layers above it: plug-in strategies and files, as a Protocol.

The config package parses and validates data only: it imports no strategy and opens no file.
The checks that need them (is a strategy name a strategy and are its options right, is an
``access_log.record`` label a key the consistent_hash parser reads, do the TLS and CA files
load) are handed to ``parse_config`` by balancer/loading.py, the one loading pipeline, so their
problems land in the same list, at the same place and in the same words. Without them
(``SHAPE_ONLY``) ``parse_config`` checks the shape of the data and takes names as written.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

from balancer.config.model import StrategyConfig


class PluginChecks(Protocol):
    """The checks above the config package (balancer/loading.py ``PIPELINE_CHECKS``)."""

    def strategy_options(self, name: str, options: Mapping[str, Any]) -> list[str]:
        """Problems with ``options`` of strategy ``name``, each ``key: must be ...``; raises
        ValueError (one line) when ``name`` is no strategy."""
        ...

    def record_label(self, item: Any) -> str:
        """An ``access_log.record`` item → its label (``header:x-tenant``); raises ValueError or
        TypeError (one line) when it is no key."""
        ...

    def hash_labels(self, strategy: StrategyConfig) -> tuple[str, ...]:
        """The label of a consistent_hash strategy's key, if it is one and has one."""
        ...

    def server_pair(self, cert: str, key: str) -> None:
        """Raise ValueError (one line naming the file) unless the pair loads."""
        ...

    def ca_file(self, path: str) -> None:
        """Raise ValueError (one line naming the file) unless ``path`` holds PEM CAs."""
        ...


class ShapeOnly:
    """No plug-in or file checks: strategy names, record labels and files as written."""

    def strategy_options(self, name: str, options: Mapping[str, Any]) -> list[str]:
        return []

    def record_label(self, item: Any) -> str:
        if not isinstance(item, str) or not item.strip():
            raise TypeError(f"must be a non-empty string, got {item!r}")
        return item.strip()

    def hash_labels(self, strategy: StrategyConfig) -> tuple[str, ...]:
        return ()

    def server_pair(self, cert: str, key: str) -> None:
        return None

    def ca_file(self, path: str) -> None:
        return None


SHAPE_ONLY: PluginChecks = ShapeOnly()
