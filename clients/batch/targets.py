"""Which channels and streams charrnn-batch opens: --target values split into channels, streams per channel.

A target with a gRPC resolver scheme (dns:, ipv4:, ...) is one channel even when it names several addresses
(gRPC's round_robin spreads streams over them); any other value is split on commas, a channel per host:port.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clients.client import channel_options

RESOLVER_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p"})
"""gRPC target schemes; such a target is one channel even if it names several addresses, comma-separated."""


def batch_channel_options() -> list[tuple[str, Any]]:
    """clients.client's options (round_robin service config) without gRPC's own retries, reconnecting quickly."""
    # gRPC's transparent retries would hold a chunk for seconds on a dead server; the job retries it elsewhere.
    options = [(key, value) for key, value in channel_options() if key != "grpc.enable_retries"]
    return options + [
        ("grpc.enable_retries", 0),
        # Reconnect quickly once a restarted server listens again (gRPC's default backoff grows to 120 s).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


def split_targets(values: Sequence[str]) -> list[str]:
    """Each --target value is one channel if it has a resolver scheme (dns:, ipv4:, ...), else comma-split."""
    targets: list[str] = []
    for value in values:
        value = value.strip()
        if value.split(":", 1)[0] in RESOLVER_SCHEMES:
            targets.append(value)
        else:
            targets.extend(part.strip() for part in value.split(",") if part.strip())
    return targets


def streams_for(target: str, streams: int) -> int:
    """Streams to open on a target: --streams, or (0) two per address it names, four for a name to resolve."""
    if streams > 0:
        return streams
    scheme, _, rest = target.partition(":")
    if scheme in ("ipv4", "ipv6"):
        return 2 * max(1, len([part for part in rest.split(",") if part]))
    if scheme in RESOLVER_SCHEMES:
        return 4
    return 2
