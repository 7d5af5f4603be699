"""The outbound-URL guard (SSRF) of image_url downloads and webhook deliveries.

Two kinds of fault are injected: addresses that look global to Python's ipaddress but carry a private IPv4
address (NAT64, 6to4, IPv4-compatible/-mapped, Teredo), and DNS rebinding (a name that answers one address
to the check and another to the connect). No test reaches the internet: IP literals need no lookup, names are
answered by a resolver passed in, and the `network` fixture stands in for everything beyond loopback.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import ipaddress
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpcore
import httpx
import pytest
from PIL import Image
from pydantic import SecretStr

from api.errors import ApiError
from api.intake import check_public_url, fetch_image
from jobs.netguard import (
    ForbiddenAddress,
    InvalidURL,
    embedded_ipv4,
    is_forbidden,
    pin,
    resolve_checked,
    send_pinned,
)
from jobs.record import JobRecord, WebhookState
from jobs.settings import Settings
from tests.servers import Service
from worker.webhooks import deliver_webhook

# (address, the IPv4 addresses it carries)
EMBEDDED = [
    ("64:ff9b::7f00:1", ["127.0.0.1"]),  # NAT64 well-known prefix
    ("64:ff9b::a9fe:a9fe", ["169.254.169.254"]),  # NAT64 of the cloud metadata address
    ("64:ff9b:1::7f00:1", ["127.0.0.1"]),  # NAT64 local-use prefix, /96 form
    ("64:ff9b::808:808", ["8.8.8.8"]),
    ("2002:7f00:1::", ["127.0.0.1"]),  # 6to4: bits 16-48
    ("2002:a9fe:a9fe::", ["169.254.169.254"]),
    ("2002:808:808::1", ["8.8.8.8"]),
    ("::127.0.0.1", ["127.0.0.1"]),  # IPv4-compatible
    ("::a00:1", ["10.0.0.1"]),
    ("::ffff:127.0.0.1", ["127.0.0.1"]),  # IPv4-mapped
    ("::ffff:10.0.0.1", ["10.0.0.1"]),
    ("::ffff:0:a9fe:a9fe", ["169.254.169.254"]),  # SIIT IPv4-translated
    # Teredo: server 8.8.8.8 in bits 32-64, client 127.0.0.1 stored inverted (0x80fffffe)
    ("2001:0:808:808:8000:ffff:80ff:fffe", ["8.8.8.8", "127.0.0.1"]),
    ("2001:0:a00:1:8000:ffff:f7f7:f7f7", ["10.0.0.1", "8.8.8.8"]),  # server 10.0.0.1, client 8.8.8.8
    ("::", []),  # the unspecified address, not 0.0.0.0
    ("::1", []),  # loopback, not 0.0.0.1
    ("2606:4700:4700::1111", []),
    ("8.8.8.8", []),
]

REFUSED = [
    "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::7f00:1",
    "64:ff9b:1::808:808",  # local-use NAT64 is a site's own translator: refused whatever it carries
    "64:ff9b::e000:1",  # NAT64 of multicast 224.0.0.1
    "2002:7f00:1::",
    "2002:a9fe:a9fe::",
    "::127.0.0.1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:0:7f00:1",
    "2001:0:a00:1:8000:ffff:f7f7:f7f7",  # Teredo, private server
    "2001:0:808:808:8000:ffff:80ff:fffe",  # Teredo, loopback client
    "::",
    "::1",
    "fe80::1",
    "fc00::1",
    "ff02::1",
    "127.0.0.1",
    "10.1.2.3",
    "169.254.169.254",
    "100.64.0.1",
    "224.0.0.1",
    "0.0.0.0",
]
PUBLIC = ["8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808"]


def literal_url(address: str, port: int = 8080, scheme: str = "http") -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}:{port}/x.png"


def no_lookup(host: str, port: int) -> list[str]:
    raise AssertionError(f"an IP literal was looked up ({host})")


def answers(*addresses: str) -> Callable[[str, int], list[str]]:
    return lambda host, port: list(addresses)


class Rebinding:
    """A DNS answer that changes: `first` to the first lookup of a name, `then` to every later one."""

    def __init__(self, first: str, then: str) -> None:
        self.first, self.then = first, then
        self.lookups: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        return [self.first if len(self.lookups) == 1 else self.then]


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "gray").save(buf, format="PNG")
    return buf.getvalue()


class Recording(HTTPServer):
    """A local HTTP server that counts what reaches it: the photo, a redirect, or a webhook receiver."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), Handler)
        self.seen: list[tuple[str, str, str | None]] = []  # (method, path, Host header)
        self.redirects: dict[str, str] = {}
        self.sni: list[str | None] = []

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class Handler(BaseHTTPRequestHandler):
    server: Recording

    def _answer(self) -> None:
        self.server.seen.append((self.command, self.path, self.headers.get("Host")))
        if self.command == "POST":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path in self.server.redirects:
            self.send_response(302)
            self.send_header("Location", self.server.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = png()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serving(server: Recording) -> Iterator[Recording]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def local() -> Iterator[Recording]:
    """The thing an attacker wants reached: an HTTP server on loopback."""
    with serving(Recording()) as server:
        yield server


@pytest.fixture
def relay() -> Iterator[Recording]:
    """Plays a public server (the `network` fixture routes 8.8.8.8 to it): answers with redirects."""
    with serving(Recording()) as server:
        yield server


class Network:
    """httpcore's view of the network in these tests. Names are looked up with `resolver` (what the client's own
    DNS lookup would answer); loopback is reachable, `routes` map a stand-in public address to a local server,
    and every other address fails at once (there is no internet here; this keeps the failure fast)."""

    def __init__(self) -> None:
        self.resolver: Callable[[str, int], Sequence[str]] = no_lookup
        self.routes: dict[str, str] = {}
        self.connects: list[str] = []  # the address of every connection the HTTP client opened


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> Network:
    net = Network()
    connect_tcp = httpcore.SyncBackend.connect_tcp

    def connect(backend: httpcore.SyncBackend, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        try:
            address = str(ipaddress.ip_address(host))
        except ValueError:
            address = net.resolver(host, port)[0]  # the client resolved the name itself
        net.connects.append(address)
        routed = net.routes.get(address, address)
        if not ipaddress.ip_address(routed).is_loopback:
            raise httpcore.ConnectError(f"{address} is unreachable in this test")
        return connect_tcp(backend, routed, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", connect)
    return net


def settings(**overrides: Any) -> Settings:
    return Settings(url_timeout_s=10, max_upload_bytes=1_000_000, **overrides)


# ---- which addresses carry an IPv4 address, and which are refused ----


@pytest.mark.parametrize(("address", "carried"), EMBEDDED, ids=[e[0] for e in EMBEDDED])
def test_embedded_ipv4(address: str, carried: list[str]) -> None:
    """Fault: an IPv6 address that delivers to an IPv4 address inside it; it must be found."""
    assert [str(a) for a in embedded_ipv4(ipaddress.ip_address(address))] == carried


def test_teredo_client_is_inverted() -> None:
    """Fault: a Teredo address built bit by bit for a private client; the client must be read back un-inverted."""
    server, client = ipaddress.IPv4Address("192.0.2.1"), ipaddress.IPv4Address("10.9.8.7")
    teredo = ipaddress.IPv6Address((0x20010000 << 96) | (int(server) << 64) | (int(client) ^ 0xFFFFFFFF))
    assert embedded_ipv4(teredo) == (server, client)
    assert is_forbidden(teredo)


@pytest.mark.parametrize("address", REFUSED)
def test_forbidden_addresses(address: str) -> None:
    """Fault: a non-public address, or one that only looks public to Python's ipaddress (NAT64, 6to4, ...)."""
    assert is_forbidden(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    """Fault: none; a public IPv4, IPv6 and the NAT64 form of a public IPv4 must not be refused."""
    assert not is_forbidden(ipaddress.ip_address(address))
    target = resolve_checked(literal_url(address), resolver=no_lookup)
    assert target.addresses == (ipaddress.ip_address(address),)


@pytest.mark.parametrize("address", [a for a in REFUSED if ":" in a] + ["127.0.0.1", "169.254.169.254"])
def test_literal_urls_are_refused(address: str) -> None:
    """Fault: a URL whose host is such an address as a literal, e.g. http://[::127.0.0.1]:8080/."""
    with pytest.raises(ForbiddenAddress) as caught:
        resolve_checked(literal_url(address), resolver=no_lookup)
    assert not isinstance(caught.value, InvalidURL)


def test_names_are_refused_if_any_answer_is_forbidden() -> None:
    """Fault: a name with a public and a hidden private answer; the message does not name the private one."""
    with pytest.raises(ForbiddenAddress) as caught:
        resolve_checked("http://mixed.test/", resolver=answers("8.8.8.8", "64:ff9b::a9fe:a9fe"))
    assert "a9fe" not in str(caught.value) and "169.254" not in str(caught.value)
    assert "mixed.test" in str(caught.value)
    with pytest.raises(OSError):
        resolve_checked("http://empty.test/", resolver=answers())
    with pytest.raises(InvalidURL):
        resolve_checked("ftp://example.test/", resolver=no_lookup)


def test_allow_private_skips_the_check_but_still_pins() -> None:
    """Fault: none; allow_private lets loopback through, and the target is still the one address looked up."""
    dns = Rebinding("127.0.0.1", "10.0.0.1")
    target = resolve_checked("http://hooks.test:9000/h", allow_private=True, resolver=dns)
    assert target.addresses == (ipaddress.ip_address("127.0.0.1"),) and dns.lookups == ["hooks.test"]


# ---- pinning: the request goes to the checked address, with its Host header and TLS server name ----


@pytest.mark.parametrize(
    ("url", "address", "pinned", "host"),
    [
        ("https://example.test:8443/a?b=1", "8.8.8.8", "https://8.8.8.8:8443/a?b=1", "example.test:8443"),
        ("https://example.test/a", "2606:4700:4700::1111", "https://[2606:4700:4700::1111]/a", "example.test"),
        ("http://example.test:80/a", "8.8.8.8", "http://8.8.8.8/a", "example.test"),
    ],
)
def test_pin_keeps_host_and_server_name(url: str, address: str, pinned: str, host: str) -> None:
    """Fault: a request that would be sent to the name (a fresh lookup); pinned, it names the checked IP,
    and keeps the original Host header (port when not the default) and TLS server name (sni_hostname)."""
    target = resolve_checked(url, resolver=answers(address))
    request = pin(httpx.Request("GET", url, headers={"X-Any": "1"}), target)
    assert str(request.url) == pinned
    assert request.headers["host"] == host and request.headers["x-any"] == "1"
    assert request.extensions["sni_hostname"] == "example.test"


def test_pin_refuses_a_request_for_another_url() -> None:
    """Fault: a request for another host than the checked one; pinning it would send it to the wrong address."""
    target = resolve_checked("http://example.test/", resolver=answers("8.8.8.8"))
    with pytest.raises(ValueError):
        pin(httpx.Request("GET", "http://other.test/"), target)


def test_pinned_request_keeps_host_header_on_the_wire(local: Recording, network: Network) -> None:
    """Fault: none (allow_private_urls on); the server, reached by IP, must see Host: example.test:PORT."""
    data, content_type = fetch_image(
        f"http://example.test:{local.port}/cat.png", settings(allow_private_urls=True), answers("127.0.0.1")
    )
    assert data == png() and content_type == "image/png"
    assert local.seen == [("GET", "/cat.png", f"example.test:{local.port}")]
    assert network.connects == ["127.0.0.1"]  # by the address; the client never looked the name up


def test_send_pinned_tries_the_next_checked_address() -> None:
    """Fault: the first checked address refuses the connection; the next checked address is used, no lookup."""
    with serving(Recording()) as running:
        target = resolve_checked(
            f"http://two.test:{running.port}/", allow_private=True, resolver=answers("127.0.0.2", "127.0.0.1")
        )
        with httpx.Client() as client:
            response = send_pinned(client, client.build_request("GET", f"http://two.test:{running.port}/"), target)
        assert response.status_code == 200 and len(running.seen) == 1


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def test_pinned_tls_uses_the_original_server_name(tmp_path: Path, network: Network) -> None:
    """Fault: an HTTPS connection made to the IP; without sni_hostname the certificate of example.test fails
    to verify against 127.0.0.1 (the control), with it the handshake names and verifies example.test."""
    cert_file, key_file = self_signed(tmp_path, "example.test")
    server = Recording()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)

    def record_server_name(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        server.sni.append(name)

    context.sni_callback = record_server_name
    server.socket = context.wrap_socket(server.socket, server_side=True)
    trust = ssl.create_default_context(cafile=str(cert_file))
    with serving(server) as running:
        url = f"https://example.test:{running.port}/cat.png"
        target = resolve_checked(url, allow_private=True, resolver=answers("127.0.0.1"))
        with httpx.Client(verify=trust) as client:
            response = send_pinned(client, client.build_request("GET", url), target)
            assert response.status_code == 200 and response.content == png()
            assert running.sni == ["example.test"]
            assert running.seen == [("GET", "/cat.png", f"example.test:{running.port}")]
            # the control: the same request to the IP without the server name extension does not verify
            plain = pin(client.build_request("GET", url), target)
            plain.extensions.pop("sni_hostname")
            with pytest.raises(httpx.ConnectError):
                client.send(plain)
    assert network.connects == ["127.0.0.1", "127.0.0.1"]


# ---- DNS rebinding ----


def test_rebinding_public_then_loopback_never_reaches_loopback(local: Recording, network: Network) -> None:
    """Fault: DNS rebinding; the name answers a public address to the first lookup, 127.0.0.1 to later ones.
    The download connects to the checked public address (unreachable here) and never to the local server."""
    dns = Rebinding("8.8.8.8", "127.0.0.1")
    network.resolver = dns  # what the HTTP client would get if it looked the name up again
    with pytest.raises(ApiError) as caught:
        fetch_image(f"http://rebind.test:{local.port}/cat.png", settings(), dns)
    assert caught.value.code == "url_fetch_failed" and caught.value.status == 422
    assert network.connects == ["8.8.8.8"] and dns.lookups == ["rebind.test"]
    assert local.seen == []


def test_without_pinning_the_same_rebinding_reaches_loopback(local: Recording, network: Network) -> None:
    """Fault: the same rebinding against check-then-connect (the old flow: check, then a plain httpx call that
    looks the name up again). It reaches the local server, so the test above can fail."""
    dns = Rebinding("8.8.8.8", "127.0.0.1")
    network.resolver = dns
    url = f"http://rebind.test:{local.port}/cat.png"
    resolve_checked(url, resolver=dns)  # the check passes: 8.8.8.8
    assert httpx.get(url).status_code == 200
    assert network.connects == ["127.0.0.1"] and len(local.seen) == 1


def test_rebinding_loopback_first_is_refused(local: Recording, network: Network) -> None:
    """Fault: DNS rebinding the other way round; the name answers 127.0.0.1 first and a public address later."""
    dns = Rebinding("127.0.0.1", "8.8.8.8")
    network.resolver = dns
    with pytest.raises(ApiError) as caught:
        fetch_image(f"http://rebind.test:{local.port}/cat.png", settings(), dns)
    assert caught.value.code == "url_forbidden" and caught.value.status == 403
    assert "127.0.0.1" not in caught.value.message
    assert network.connects == [] and local.seen == []


@pytest.mark.parametrize("hop", ["name", "literal"])
def test_every_redirect_hop_is_resolved_checked_and_pinned(
    local: Recording, relay: Recording, network: Network, hop: str
) -> None:
    """Fault: a public server redirects to a name that resolves to loopback, or to [::ffff:127.0.0.1]."""
    network.routes["8.8.8.8"] = "127.0.0.1"  # the relay plays a public server at 8.8.8.8
    target = (
        f"http://inside.test:{local.port}/cat.png"
        if hop == "name"
        else f"http://[::ffff:127.0.0.1]:{local.port}/cat.png"
    )
    relay.redirects["/start"] = target
    dns: dict[str, str] = {"outside.test": "8.8.8.8", "inside.test": "127.0.0.1"}
    network.resolver = lambda host, port: [dns[host]]
    with pytest.raises(ApiError) as caught:
        fetch_image(f"http://outside.test:{relay.port}/start", settings(), lambda host, port: [dns[host]])
    assert caught.value.code == "url_forbidden"
    assert [s[1] for s in relay.seen] == ["/start"] and local.seen == []
    assert network.connects == ["8.8.8.8"]


# ---- through the real API (image_url) and the API's webhook_url check ----


@pytest.mark.parametrize(
    "address", ["64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::", "::127.0.0.1", "::ffff:127.0.0.1"]
)
def test_api_refuses_image_url_forms(service: Service, local: Recording, address: str) -> None:
    """Fault: image_url naming loopback/metadata through an IPv6 form Python calls global: 403 url_forbidden."""
    url = f"http://[{address}]:{local.port}/x.png"
    with service.client("alice") as client:
        response = client.post("/v1/jobs", json={"image_url": url})
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == "url_forbidden" and error["field"] == "image_url"
    assert local.seen == []


@pytest.mark.parametrize("address", ["64:ff9b::7f00:1", "2002:a9fe:a9fe::", "::127.0.0.1", "::ffff:10.0.0.1"])
def test_webhook_url_check_refuses_forms(address: str) -> None:
    """Fault: webhook_url naming a private address through an IPv6 form; the check the API runs at job creation
    (the shared service fixture allows private webhooks, so this calls it as the API does with them refused)."""
    with pytest.raises(ApiError) as caught:
        check_public_url(f"http://[{address}]:9/hook", settings(), "webhook_url", allow_private=False)
    assert caught.value.code == "url_forbidden" and caught.value.field == "webhook_url"


# ---- the worker's webhook delivery ----


class MemoryStore:
    def __init__(self, record: JobRecord) -> None:
        self.records = {record.id: record}

    def get(self, job_id: str) -> JobRecord | None:
        return self.records.get(job_id)

    def update(self, job_id: str, change: Callable[[JobRecord], JobRecord | None]) -> JobRecord | None:
        new = change(self.records[job_id])
        if new is not None:
            self.records[job_id] = new
        return new


def deliver(url: str, allow_private: bool) -> WebhookState:
    record = JobRecord(owner="t", status="failed", webhook=WebhookState(url=url))
    runtime = SimpleNamespace(
        store=MemoryStore(record),
        settings=Settings(allow_private_webhooks=allow_private, webhook_secret=SecretStr("whsec-test")),
        objects=None,
    )
    deliver_webhook(runtime, record.id, final_attempt=True)
    hook = runtime.store.records[record.id].webhook
    assert hook is not None
    return hook


@pytest.mark.parametrize("host", ["[64:ff9b::7f00:1]", "[::ffff:127.0.0.1]", "[::127.0.0.1]", "localhost"])
def test_worker_refuses_private_webhooks(local: Recording, host: str) -> None:
    """Fault: a webhook_url that is, or (localhost) resolves to, loopback when private webhooks are refused.
    Nothing is sent, and the recorded error does not name an address the job's owner did not send."""
    hook = deliver(f"http://{host}:{local.port}/hook", allow_private=False)
    assert hook.state == "failed" and hook.last_error and hook.last_error.startswith("ForbiddenAddress")
    if host == "localhost":
        assert "127.0.0.1" not in hook.last_error and "::1" not in hook.last_error
    assert local.seen == []


def test_worker_delivers_pinned_when_private_webhooks_are_allowed(local: Recording) -> None:
    """Fault: none (allow_private_webhooks on); the POST arrives, pinned to the looked-up address, with its Host."""
    hook = deliver(f"http://localhost:{local.port}/hook", allow_private=True)
    assert hook.state == "delivered" and hook.last_status == 200
    assert local.seen == [("POST", "/hook", f"localhost:{local.port}")]
