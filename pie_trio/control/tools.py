"""Tool I/O: the `http_request` op, an outbound HTTP request an inferlet asks the server to make.

An agent whose loop runs next to the model keeps its KV cache across every tool call; this op is
what lets it make those calls. A shared server must not become an open proxy, so every request
passes the operator's `ToolPolicy`:

- tool I/O is off unless the operator turns it on (`tool_io`);
- the URL's host and port must be on the allow-list (`tool_allow`): host names (`api.example`,
  `*.example`) or addresses and networks (`10.0.0.0/8`, `[::1]`), each with an optional port.
  The check runs *after* DNS resolution: a host not listed by name is allowed only when every
  address it resolves to lies in a listed network, and a listed name may not resolve to a
  loopback, link-local, unspecified or multicast address unless a network entry covers that
  address (so `localhost` and cloud metadata are reachable only when listed as addresses). The
  connection is pinned to the checked address (the URL is rewritten to it; `Host` and TLS
  server name stay the original name), so a second, different DNS answer cannot slip past;
- redirects are followed here, one hop at a time, and each hop is checked again
  (`tool_max_redirects`); credentials are dropped when a redirect changes host;
- each request has a deadline (`tool_timeout`, or less if the guest asks) and its response body
  is read as a stream and refused past `tool_max_response_size` bytes (content is requested
  without compression, so the limit is what the guest receives);
- an instance has at most `tool_max_concurrent` requests in flight; one more is refused.

Every refusal is an error response naming the setting that refused it. Environment proxies are
ignored (they would bypass the allow-list). The request runs as the op's own task in the
instance's nursery, so closing the instance cancels it and closes its connection.
"""

from __future__ import annotations

import ipaddress
import json
import re
import ssl
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import trio

from pie_trio.control.fields import ControlError, Fields, type_name

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
DEFAULT_PORTS = {"http": 80, "https": 443}
ALLOW = "setting tool_allow"


@dataclass(frozen=True)
class AllowRule:
    """One allow-list entry: a host name pattern or a network, and an optional port."""

    name: str | None = None  # lower-case host name; "*.x" matches every sub-domain of x
    network: IPNetwork | None = None
    port: int | None = None  # None: any port

    @classmethod
    def parse(cls, entry: str) -> AllowRule:
        try:
            host, port = _split_port(entry.strip())
        except ValueError:
            raise ValueError(f"bad port in tool_allow entry {entry!r}") from None
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"bad port in tool_allow entry {entry!r}")
        try:
            network = ipaddress.ip_network(host, strict=False)
        except ValueError:
            if not re.fullmatch(r"(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?", host.lower()):
                raise ValueError(f"bad tool_allow entry {entry!r}: expected HOST[:PORT], "
                                 "*.DOMAIN[:PORT] or ADDRESS/BITS[:PORT]") from None
            return cls(name=host.lower(), port=port)
        return cls(network=network, port=port)

    def names(self, host: str, port: int) -> bool:
        if self.name is None or self.port not in (None, port):
            return False
        if self.name.startswith("*."):
            return host.endswith(self.name[1:])
        return host == self.name

    def covers(self, address: IPAddress, port: int) -> bool:
        return (self.network is not None and self.port in (None, port)
                and address.version == self.network.version and address in self.network)


def _split_port(entry: str) -> tuple[str, int | None]:
    """'host:80' → ('host', 80); '[::1]:80' → ('::1', 80); bare IPv6 and no port → None."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port)
    return entry, None


@dataclass(frozen=True)
class ToolPolicy:
    """What the operator allows inferlets to reach; the default allows nothing."""

    enabled: bool = False  # tool_io
    allow: tuple[str, ...] = ()  # tool_allow
    timeout: float = 30.0  # tool_timeout: seconds per request, redirects included
    max_response_bytes: int = 1 << 20  # tool_max_response_size
    max_concurrent: int = 16  # tool_max_concurrent: per instance
    max_redirects: int = 5  # tool_max_redirects
    rules: tuple[AllowRule, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(AllowRule.parse(e) for e in self.allow))


class Tools:
    """The tool policy all instances share, and the TLS context built once for it."""

    def __init__(self, policy: ToolPolicy | None = None):
        self.policy = policy or ToolPolicy()
        self._tls: ssl.SSLContext | None = None

    def tls(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls


@dataclass
class InstanceTools:
    """One instance's tool I/O: the shared policy and its requests in flight."""

    shared: Tools = field(default_factory=Tools)
    in_flight: int = 0


class _HasTools(Protocol):
    @property
    def tools(self) -> InstanceTools: ...


@dataclass
class _Hop:
    """One request of a (possibly redirected) exchange."""

    method: str
    url: httpx.URL
    headers: dict[str, str]
    body: bytes | None


# -- the op -----------------------------------------------------------------------------------


async def http_request(ctx: _HasTools, f: Fields, priority: int) -> dict[str, Any]:
    tools = ctx.tools
    policy = tools.shared.policy
    if not policy.enabled:
        raise ControlError("tool I/O is disabled on this server (setting tool_io)")
    hop, limit, follow, parse_json = _read_request(f, policy)
    if tools.in_flight >= policy.max_concurrent:
        raise ControlError(f"this instance has {tools.in_flight} requests in flight already "
                           f"(setting tool_max_concurrent)")
    tools.in_flight += 1
    try:
        with trio.move_on_after(limit[0]) as deadline:
            answer = await _follow(tools.shared, hop, follow)
    finally:
        tools.in_flight -= 1
    if deadline.cancelled_caught:
        raise ControlError(f"no complete response within {limit[0]:g} s ({limit[1]})")
    return _with_json(answer) if parse_json else answer


def _read_request(f: Fields, policy: ToolPolicy
                  ) -> tuple[_Hop, tuple[float, str], bool, bool]:
    method = f.text("method", "GET").upper()
    if method not in METHODS:
        raise f.error(f"method {method!r} is not one of {', '.join(sorted(METHODS))}")
    try:
        url = httpx.URL(f.text("url"))
    except httpx.InvalidURL as exc:
        raise f.error(f"bad url: {exc}") from None
    headers = _headers(f)
    body = _body(f, headers)
    limit = (policy.timeout, "setting tool_timeout")
    timeout_ms = f.integer("timeout_ms", None, low=1)
    if timeout_ms is not None and timeout_ms / 1000 < policy.timeout:
        limit = (timeout_ms / 1000, "field timeout_ms")
    return (_Hop(method, url, headers, body), limit, bool(f.flag("follow_redirects", True)),
            bool(f.flag("parse_json", False)))


def _headers(f: Fields) -> dict[str, str]:
    raw = f.anything("headers") or {}
    pairs = raw.items() if isinstance(raw, dict) else raw
    headers: dict[str, str] = {}
    try:
        for name, value in pairs:
            if not isinstance(name, str) or not isinstance(value, str):
                raise ValueError
            headers[name.lower()] = value
    except (TypeError, ValueError):
        raise f.error("field 'headers' must be a map of str to str or a list of "
                      f"[str, str], got {type_name(raw)}") from None
    if "host" in headers:
        raise f.error("header 'host' is set by the server from the url")
    headers["accept-encoding"] = "identity"  # the size limit is on what the guest receives
    return headers


def _body(f: Fields, headers: dict[str, str]) -> bytes | None:
    if f.anything("json") is not None:
        if f.anything("body") is not None:
            raise f.error("give one of 'body' and 'json', not both")
        headers.setdefault("content-type", "application/json")
        return json.dumps(f.anything("json")).encode()
    body = f.anything("body")
    if body is None:
        return None
    if isinstance(body, str):
        return body.encode()
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    raise f.error(f"field 'body' must be bin or a str, got {type_name(body)}")


def _with_json(answer: dict[str, Any]) -> dict[str, Any]:
    try:
        answer["json"] = json.loads(answer["body"])
    except ValueError as exc:
        raise ControlError(f"the response is not JSON ({exc})") from None
    return answer


# -- redirects, one checked hop at a time ------------------------------------------------------


async def _follow(tools: Tools, hop: _Hop, follow: bool) -> dict[str, Any]:
    policy = tools.policy
    for _ in range(policy.max_redirects + 1):
        answer = await _exchange(tools, hop)
        location = _location(answer)
        if not follow or answer["status"] not in REDIRECTS or location is None:
            return answer
        hop = _redirected(hop, answer["status"], location)
    raise ControlError(f"more than {policy.max_redirects} redirects "
                       "(setting tool_max_redirects)")


def _location(answer: dict[str, Any]) -> str | None:
    for name, value in answer["headers"]:
        if name == "location":
            return str(value)
    return None


def _redirected(hop: _Hop, status: int, location: str) -> _Hop:
    try:
        url = hop.url.join(location)
    except httpx.InvalidURL as exc:
        raise ControlError(f"redirect to a bad url: {exc}") from None
    headers = dict(hop.headers)
    if url.host != hop.url.host:
        headers.pop("authorization", None)
        headers.pop("cookie", None)
    method, body = hop.method, hop.body
    if status == 303 or (status in (301, 302) and method == "POST"):
        method, body = ("HEAD" if method == "HEAD" else "GET"), None
        headers.pop("content-type", None)
    return _Hop(method, url, headers, body)


# -- one checked, pinned, size-limited exchange ------------------------------------------------


async def _exchange(tools: Tools, hop: _Hop) -> dict[str, Any]:
    url = hop.url
    address = await _checked_address(tools.policy, url)
    pinned = url.copy_with(host=str(address))
    headers = dict(hop.headers, host=url.netloc.decode("ascii"))
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    try:
        async with httpx.AsyncClient(verify=tools.tls(), trust_env=False, timeout=None,
                                     follow_redirects=False) as client:
            async with client.stream(hop.method, pinned, headers=headers, content=hop.body,
                                     extensions=extensions) as response:
                body = await _read_body(response, tools.policy.max_response_bytes)
                return {"status": response.status_code, "url": str(url),
                        "headers": [[k.decode("latin-1"), v.decode("latin-1")]
                                    for k, v in response.headers.raw],
                        "body": body}
    except httpx.HTTPError as exc:
        raise ControlError(f"{url}: {type(exc).__name__}: {exc}") from None


async def _read_body(response: httpx.Response, limit: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> ControlError:
    return ControlError(f"the response is larger than {limit} bytes "
                        "(setting tool_max_response_size)")


async def _checked_address(policy: ToolPolicy, url: httpx.URL) -> IPAddress:
    """The address to connect to for `url`, after the allow-list has passed every address the
    host resolves to."""
    if url.scheme not in DEFAULT_PORTS:
        raise ControlError(f"{url}: only http and https urls are allowed")
    host = url.host.lower()
    port = url.port or DEFAULT_PORTS[url.scheme]
    named = any(rule.names(host, port) for rule in policy.rules)
    if not named and not any(rule.network is not None for rule in policy.rules):
        raise _refused(host, port)
    try:
        addresses = await _resolve(host, port)
    except ControlError:
        if named:
            raise
        raise _refused(host, port) from None  # it cannot be shown to be in a listed network
    for address in addresses:
        if any(rule.covers(address, port) for rule in policy.rules):
            continue
        if not named:
            raise _refused(host, port, address)
        if _special(address):
            raise ControlError(f"host {host!r} resolves to {address}, a loopback, link-local "
                               f"or otherwise special address not listed ({ALLOW})")
    return addresses[0]


def _refused(host: str, port: int, address: IPAddress | None = None) -> ControlError:
    where = "" if address is None or str(address) == host else f" (address {address})"
    return ControlError(f"host {host!r} port {port}{where} is not on the allow-list ({ALLOW})")


async def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [_plain(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    except OSError as exc:
        raise ControlError(f"cannot resolve host {host!r}: {exc}") from None
    addresses: list[IPAddress] = []
    for info in infos:
        address = _plain(ipaddress.ip_address(str(info[4][0]).partition("%")[0]))
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise ControlError(f"cannot resolve host {host!r}")
    return addresses


def _plain(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address it is (so ::ffff:127.0.0.1 is loopback)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _special(address: IPAddress) -> bool:
    return (address.is_loopback or address.is_link_local or address.is_unspecified
            or address.is_multicast or address.is_reserved)
