"""Targets: one server, or several replicas that gRPC's own round_robin balances."""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from tensorwire._transport.channel import split_address
from tensorwire.errors import UnavailableError

#: The service config of every client channel whose options name no policy of their
#: own: calls go to each connected address the target resolves to in turn, and an
#: address that stops answering is skipped until it connects again. With one address
#: it behaves as gRPC's default (pick_first) would.
ROUND_ROBIN: Final = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

#: The URI schemes gRPC resolves itself; any other target is host:port, or a list.
SCHEMES: Final = frozenset(
    {"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p"}
)

#: gRPC's port for a DNS name given without one.
_DEFAULT_PORT: Final = "443"


@dataclass(frozen=True)
class Target:
    """Where a client connects."""

    #: How repr and errors name it: as the caller wrote it.
    name: str
    #: The gRPC target its channel opens.
    channel: str
    #: The channel's :authority, which is also the name TLS checks the server's
    #: certificate for; None: gRPC's own (the host of a single address).
    authority: str | None = None


def parse_target(target: str | Sequence[str]) -> Target:
    """``target`` as a channel: a ``host:port`` or gRPC URI (``dns:///name:port``,
    ``ipv4:a:p,b:p``, ``unix:path``) as it is; several ``host:port`` addresses (a
    sequence, or one comma-separated string) as one ``ipv4:``/``ipv6:`` list, host
    names resolved now, once, and :authority the first address, as written."""
    if isinstance(target, str):
        if "," not in target or _scheme(target) in SCHEMES:
            return Target(target, target)
        addresses = [address.strip() for address in target.split(",")]
    elif all(isinstance(address, str) for address in target):
        addresses = [address.strip() for address in target]
    else:
        raise TypeError("target must be a str or a sequence of 'host:port' strs")
    name = ",".join(addresses)
    if not all(addresses):
        raise ValueError(f"target {name!r} has an empty address")
    if len(addresses) == 1:
        return Target(name, name)
    found: dict[str, int] = {}  # "ip:port" -> address family, in order, once each
    for address in addresses:
        host, port = split_address(address)
        if not (port and port.isdigit()):
            raise ValueError(
                f"{address!r} in target {name!r}: each of several addresses is host:port"
            )
        found.update((ip, family) for family, ip in _resolve(host, port))
    if len(set(found.values())) > 1:
        raise ValueError(f"target {name!r} mixes IPv4 and IPv6 addresses: use one kind")
    scheme = "ipv6" if socket.AF_INET6 in found.values() else "ipv4"
    return Target(name, f"{scheme}:{','.join(found)}", authority=addresses[0])


def replicas(target: Target) -> list[str]:
    """The address of every server ``target`` may send a call to, to choose one from;
    [] when it reaches one server only (one IP address, a Unix socket) or gRPC's own
    resolver decides (xds:, vsock:). DNS names are resolved now."""
    scheme, _, rest = target.channel.partition(":")
    if scheme in ("ipv4", "ipv6"):
        listed = rest.split(",")
        return listed if len(listed) > 1 else []
    if scheme in SCHEMES - {"dns"}:
        return []
    host, port = split_address(_dns_name(target.channel))
    if _ip(host) is not None:
        return []
    return [ip for _, ip in _resolve(host, port or _DEFAULT_PORT)]


def pinned(target: Target, address: str) -> Target:
    """``address``, one replica of ``target``, named to the server (:authority and the
    TLS name) as ``target`` names it, so that a certificate valid for one is for both."""
    authority = target.authority
    if authority is None and _scheme(target.channel) not in SCHEMES - {"dns"}:
        authority = _dns_name(target.channel)
    return Target(address, address, authority)


def _scheme(target: str) -> str:
    scheme, sep, _ = target.partition(":")
    return scheme if sep else ""


def _dns_name(target: str) -> str:
    """``host:port`` of a ``dns:[//server/]host:port`` target, or of a bare one."""
    if _scheme(target) != "dns":
        return target
    rest = target.removeprefix("dns:")
    return rest[2:].partition("/")[2] if rest.startswith("//") else rest


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _resolve(host: str, port: str) -> list[tuple[int, str]]:
    """(address family, ``ip:port``) for each address of ``host``, IPv4 only when it
    has any: servers that listen on 0.0.0.0 are not reached over IPv6."""
    ip = _ip(host)
    if ip is not None:
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        return [(family, _join(str(ip), port, family))]
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, ValueError) as exc:
        raise UnavailableError(f"cannot resolve {host}:{port}: {exc}") from exc
    found: list[tuple[int, str]] = [(info[0], str(info[4][0])) for info in infos]
    v4 = [(family, ip) for family, ip in found if family == socket.AF_INET]
    chosen = v4 or [(family, ip) for family, ip in found if family == socket.AF_INET6]
    if not chosen:
        raise UnavailableError(f"cannot resolve {host}:{port}: no IP address")
    return list(dict.fromkeys((family, _join(ip, port, family)) for family, ip in chosen))


def _join(ip: str, port: str, family: int) -> str:
    return f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
