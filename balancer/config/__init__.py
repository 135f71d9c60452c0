"""The config: YAML data → frozen dataclasses, every problem on a line of its own.

Pure: parsing and validation only, no file reads and no plug-in imports. The package, from the
bottom: ``model`` (the dataclasses and their defaults), ``values`` (scalar parsers and the
reader that collects problems by path), ``checks`` (the Protocol for what parsing needs from
above: strategies and files), ``pools`` (the ``pools:`` section), ``parse`` (the rest and
``parse_config``). Reading a file and the plug-in and file checks are balancer/loading.py's.
"""

from balancer.config.checks import SHAPE_ONLY, PluginChecks
from balancer.config.model import (
    AccessLogConfig,
    Address,
    BackendConfig,
    BackendTlsConfig,
    ClientConfig,
    Config,
    ConfigError,
    GuardConfig,
    HealthCheckConfig,
    OutlierConfig,
    PoolConfig,
    RouteConfig,
    StrategyConfig,
    TimeoutsConfig,
    TlsConfig,
    UnreadableConfig,
    defaults,
)
from balancer.config.parse import parse_config, parse_yaml
from balancer.config.values import (
    default_backend_name,
    numeric_ip,
    parse_address,
    parse_backend_url,
    parse_duration,
    parse_size,
    unspecified_host_problem,
)

__all__ = [
    "SHAPE_ONLY", "AccessLogConfig", "Address", "BackendConfig", "BackendTlsConfig",
    "ClientConfig", "Config", "ConfigError", "GuardConfig", "HealthCheckConfig", "OutlierConfig",
    "PluginChecks", "PoolConfig", "RouteConfig", "StrategyConfig", "TimeoutsConfig", "TlsConfig",
    "UnreadableConfig", "default_backend_name", "defaults", "numeric_ip", "parse_address",
    "parse_backend_url", "parse_config", "parse_duration", "parse_size", "parse_yaml",
    "unspecified_host_problem",
]
