"""Outbound URLs the service calls for a user (image_url, webhook_url) must not reach private networks.

Checking a name and then letting the HTTP client look it up again is not enough: a DNS answer that changes
between the two lookups (rebinding) would reach whatever the second answer names. So a URL's host is resolved
once (`resolve_checked`), every answer is checked, and the request is sent to a checked address itself
(`pin`, `send_pinned`), keeping the original Host header and TLS server name.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) → the addresses to try, as strings; a seam for tests, `system_resolver` in production
Resolver = Callable[[str, int], Sequence[str]]

_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # RFC 4291 (deprecated): ::a.b.c.d
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # RFC 2765 SIIT: ::ffff:0:a.b.c.d
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215, local-use


class ForbiddenAddress(ValueError):
    """The URL's host is, or resolves to, an address the service must not call."""


class InvalidURL(ForbiddenAddress):
    """Not an http(s) URL with a host (a ForbiddenAddress, so callers that refuse those refuse this too)."""


def embedded_ipv4(address: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address carries, which a translator or tunnel would deliver to; () if none.

    IPv4-mapped, IPv4-compatible (::/96 but :: and ::1), SIIT-translated and NAT64 (64:ff9b::/96, and
    64:ff9b:1::/48 read in its /96 form) carry it in the low 32 bits; 6to4 (2002::/16) in bits 16-48;
    Teredo (2001::/32) the server in bits 32-64 and the client, inverted, in the low 32 bits.
    """
    if isinstance(address, ipaddress.IPv4Address):
        return ()
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)
    if address in _IPV4_COMPATIBLE:
        return (low32,) if int(address) > 1 else ()  # :: and ::1 are themselves, not 0.0.0.0 and 0.0.0.1
    if address in _IPV4_TRANSLATED or address in _NAT64_WELL_KNOWN or address in _NAT64_LOCAL:
        return (low32,)
    if address.sixtofour is not None:
        return (address.sixtofour,)
    if address.teredo is not None:
        return address.teredo  # (server, client), the client already un-inverted
    return ()


def is_forbidden(address: IPAddress) -> bool:
    """Not globally routable, multicast, or carrying an IPv4 address that is (Python calls many such global)."""
    if not address.is_global or address.is_multicast or address.is_unspecified:
        return True
    if isinstance(address, ipaddress.IPv6Address) and address in _NAT64_LOCAL:
        return True  # a site's own translator, whose prefix length (where the IPv4 sits) we cannot know
    return any(is_forbidden(inner) for inner in embedded_ipv4(address))


def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses for a TCP connection, in getaddrinfo's (RFC 6724) order; OSError if none."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


@dataclass(frozen=True)
class PinnedTarget:
    """A URL whose host was resolved once (and checked unless allowed): connect to `addresses`, in order."""

    url: httpx.URL
    addresses: tuple[IPAddress, ...]

    @property
    def host(self) -> str:
        """The host as sent in Host and as the TLS server name (IDNA-encoded, IPv6 without brackets)."""
        return self.url.raw_host.decode("ascii")

    @property
    def port(self) -> int:
        return self.url.port or (443 if self.url.scheme == "https" else 80)


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def resolve_checked(
    url: str | httpx.URL, allow_private: bool = False, resolver: Resolver = system_resolver
) -> PinnedTarget:
    """Resolve the URL's host once; unless allow_private, refuse it if any answer is forbidden.

    Raises InvalidURL, ForbiddenAddress (its message names the host, never the addresses it resolved to),
    or OSError when the host does not resolve.
    """
    try:
        parsed = httpx.URL(url)  # the parser that builds the request, so the host checked is the host requested
    except httpx.InvalidURL:
        raise InvalidURL("not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise InvalidURL("not an http or https URL with a host")
    target = PinnedTarget(parsed, ())
    literal = _literal(target.host)  # an IP in the URL is its own answer; no lookup
    if literal is not None:
        answers: list[IPAddress] = [literal]
    else:
        answers = [ipaddress.ip_address(a) for a in resolver(target.host, target.port)]
    addresses = tuple(dict.fromkeys(answers))  # without repeats, in order
    if not addresses:
        raise OSError(f"{target.host} has no addresses")
    if not allow_private and any(is_forbidden(a) for a in addresses):
        raise ForbiddenAddress(f"{target.host} is or resolves to a private, loopback, link-local or reserved address")
    return PinnedTarget(parsed, addresses)


def check_addresses(url: str, resolver: Resolver = system_resolver) -> None:
    """Raise ForbiddenAddress if the URL's host resolves to any forbidden address; OSError if it does not resolve."""
    resolve_checked(url, False, resolver)


def pin(request: httpx.Request, target: PinnedTarget, address: IPAddress | None = None) -> httpx.Request:
    """The same request sent to a checked address of its host: Host header and TLS server name unchanged."""
    if (request.url.scheme, request.url.raw_host, request.url.port) != (
        target.url.scheme,
        target.url.raw_host,
        target.url.port,
    ):
        raise ValueError("the request is not for the URL that was checked")
    address = target.addresses[0] if address is None else address
    if address not in target.addresses:
        raise ValueError("not an address that was checked")
    # the Host header was set from the original URL when the request was built, and stays;
    # httpcore verifies the certificate against, and sends as SNI, sni_hostname instead of the IP it connects to
    return httpx.Request(
        request.method,
        request.url.copy_with(host=str(address)),
        headers=request.headers,
        stream=request.stream,
        extensions={**request.extensions, "sni_hostname": target.host},
    )


def send_pinned(
    client: httpx.Client, request: httpx.Request, target: PinnedTarget, *, stream: bool = False
) -> httpx.Response:
    """Send the request to the target's addresses in turn until one connects (as a plain connect would)."""
    for address in target.addresses[:-1]:
        try:
            return client.send(pin(request, target, address), stream=stream)
        except httpx.ConnectError:
            continue  # refused or unreachable: nothing was sent, so the next checked address may be tried
    return client.send(pin(request, target, target.addresses[-1]), stream=stream)
