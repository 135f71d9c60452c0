"""Scalar parsers (durations, sizes, addresses, backend URLs) and the reader that walks YAML
data by path, collecting one line per problem instead of stopping at the first.

Pure: no file reads, no plug-ins; names are compared as written (``numeric_ip`` reads the forms
the C resolver takes, without resolving anything).
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import socket
from typing import Any, Callable, Mapping, TypeVar
from urllib.parse import urlsplit

from balancer.config.checks import SHAPE_ONLY, PluginChecks
from balancer.config.model import Address

T = TypeVar("T")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``500ms``, ``2s``, ``1m``, ``1h`` or a bare number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError(f"must be a duration like 500ms, 2s or 1m, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"must be >= 0, got {value}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"must be a duration like 500ms, 2s or 1m, got {value!r}")


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|[KMG]i?[bB]?|[bB])?\s*$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20,
               "mib": 1 << 20, "mb": 1000 ** 2, "g": 1 << 30, "gib": 1 << 30, "gb": 1000 ** 3}


def parse_size(value: Any) -> int:
    """Bytes: ``4096``, ``64k`` / ``64KiB`` (×1024), ``10MB`` (×1000²), ``1g`` / ``1GiB``…"""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = (m.group(2) or "").lower()
            if unit in _SIZE_UNITS:
                return int(m.group(1)) * _SIZE_UNITS[unit]
    raise ValueError(f"must be a size like 4096, 64KiB, 10MB or 1GiB, got {value!r}")


def parse_address(value: Any, default_host: str = "0.0.0.0") -> Address:
    """``host:port``, ``[v6]:port`` or ``:port`` → Address."""
    if isinstance(value, int) and not isinstance(value, bool):
        return Address(default_host, _port(value))
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be \"host:port\", got {value!r}")
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"must be \"[ipv6]:port\", got {value!r}")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"must be \"host:port\", got {value!r}")
        if ":" in host:
            raise ValueError(f"an IPv6 address needs brackets, like \"[::1]:8080\", got {value!r}")
    if not port.isdigit():
        raise ValueError(f"port must be a number, got {value!r}")
    return Address(host or default_host, _port(int(port)))


def _port(n: int) -> int:
    if not 0 <= n <= 65535:
        raise ValueError(f"port must be 0..65535, got {n}")
    return n


def parse_backend_url(url: Any) -> tuple[str, str, int]:
    """``http://host:port`` → (scheme, host, port); the default port follows the scheme."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"must be a URL like http://10.0.0.11:8000, got {url!r}")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"scheme must be http or https, got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"must not carry a path, query or fragment, got {url!r}")
    if parts.username or parts.password:
        raise ValueError(f"must not carry credentials, got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"has an invalid port, got {url!r}") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"has no host, got {url!r}")
    return parts.scheme, host.lower(), port or (443 if parts.scheme == "https" else 80)


_LEGACY_IPV4 = re.compile(r"(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}", re.IGNORECASE)


def numeric_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host written as a number connects to, or None for a name.

    Besides the usual forms this reads the ones the C resolver also takes (``127.1``, ``0``,
    ``0x7f.1``, ``010.0.0.1``), so ``127.1`` is compared as the ``127.0.0.1`` it reaches.
    An IPv4-mapped IPv6 address is its IPv4 address; a zone (``%eth0``) is dropped.
    """
    text = host.split("%", 1)[0]
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(text)
    except ValueError:
        if not _LEGACY_IPV4.fullmatch(text):
            return None
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def unspecified_host_problem(host: str) -> str | None:
    """Why ``host`` (0.0.0.0, ::, 0, …) cannot be a backend address, or None when it can.

    Connecting to the unspecified address reaches this machine on Linux, so ``0.0.0.0:9001``
    beside ``127.0.0.1:9001`` would be one server counted as two.
    """
    ip = numeric_ip(host)
    if ip is None or not ip.is_unspecified:
        return None
    loopback = "127.0.0.1" if ip.version == 4 else "::1"
    return (f"{host} is not an address to connect to (on Linux it reaches this machine's "
            f"loopback): write {loopback} for this machine, or the backend's own address")


def default_backend_name(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


class Reader:
    """Walks a mapping by path, collecting problems instead of stopping at the first."""

    def __init__(self, checks: PluginChecks = SHAPE_ONLY) -> None:
        self.problems: list[str] = []
        #: The plug-in and file checks of the pipeline above (config/checks.py).
        self.checks = checks

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}" if path else message)

    def mapping(self, value: Any, path: str, allowed: set[str]) -> dict[str, Any] | None:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.problem(path, f"must be a mapping, got {kind_of(value)}")
            return None
        for key in value:
            if key not in allowed:
                hint = closest(str(key), allowed)
                extra = f" (did you mean {hint!r}?)" if hint else ""
                self.problem(join_path(path, str(key)), f"unknown key{extra}")
        return value

    def get(self, m: Mapping[str, Any], key: str, path: str, conv: Callable[[Any], T],
            default: T) -> T:
        if key not in m or m[key] is None:
            return default
        try:
            return conv(m[key])
        except (ValueError, TypeError) as exc:
            self.problem(join_path(path, key), str(exc))
            return default


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def kind_of(value: Any) -> str:
    kinds: dict[type, str] = {list: "a list", dict: "a mapping", str: "a string"}
    return kinds.get(type(value), repr(value))


def closest(key: str, allowed: set[str]) -> str | None:
    match = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    return match[0] if match else None


def whole_number(lo: int | None = None, hi: int | None = None) -> Callable[[Any], int]:
    def conv(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"must be a whole number, got {v!r}")
        if lo is not None and v < lo:
            raise ValueError(f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise ValueError(f"must be <= {hi}, got {v}")
        return v
    return conv


def workers_count(v: Any) -> int | str:
    """``workers``: a whole number >= 1, or ``auto`` (the cores this process may run on)."""
    if v == "auto":
        return "auto"
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"must be a whole number >= 1 or auto, got {v!r}")
    return v


def fraction(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"must be a number between 0 and 1, got {v!r}")
    if not 0 <= v <= 1:
        raise ValueError(f"must be between 0 and 1, got {v}")
    return float(v)


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, got {v!r}")
    return v


def nonempty_text(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"must be a non-empty string, got {v!r}")
    return v.strip()


def positive_duration(v: Any) -> float:
    d = parse_duration(v)
    if d <= 0:
        raise ValueError(f"must be greater than 0, got {v!r}")
    return d



def size_between(lo: int, hi: int) -> Callable[[Any], int]:
    def conv(v: Any) -> int:
        n = parse_size(v)
        if not lo <= n <= hi:
            raise ValueError(f"must be between {lo} and {hi} bytes, got {v!r}")
        return n
    return conv


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
