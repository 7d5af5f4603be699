"""Outbound URLs the service calls for a user (image_url, webhook_url) must not reach private networks."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


class ForbiddenAddress(ValueError):
    pass


def check_addresses(url: str) -> None:
    """Raise ForbiddenAddress if the URL's host resolves to any non-global address; OSError if it does not resolve."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise ForbiddenAddress("no host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for info in socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP):
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global or address.is_multicast:
            raise ForbiddenAddress(f"{parts.hostname} resolves to {address}")
