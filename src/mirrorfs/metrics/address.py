"""``HOST:PORT`` of ``--metrics``: parsed and checked before anything starts (no I/O here)."""

from __future__ import annotations

import ipaddress
import re

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_USAGE = "give HOST:PORT, e.g. 127.0.0.1:9464, [::1]:9464 or 0.0.0.0:9464"


def parse_listen_address(text: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` -> ``("127.0.0.1", 9464)``; ``"[::1]:9464"`` -> ``("::1", 9464)``.

    HOST is an IPv4 address, a host name, or an IPv6 address in brackets; it is never implied,
    so listening on every interface is spelled out (``0.0.0.0`` or ``[::]``). PORT is 1-65535.

    Raises:
        ValueError: anything else (the message says what to give).
    """
    if text.startswith("["):
        inside, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r} is not HOST:PORT: {_USAGE}")
        host, port_text = inside, rest[1:]
        if not _is_ipv6(host):
            raise ValueError(f"{host!r} in {text!r} is not an IPv6 address: {_USAGE}")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not HOST:PORT: {_USAGE}")
        if ":" in host and _is_ipv6(host):
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:9464")
        if not _HOSTNAME.match(host):
            raise ValueError(f"{host!r} in {text!r} is not a host name or IPv4 address: {_USAGE}")
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} in {text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def format_address(host: str, port: int) -> str:
    """The inverse of ``parse_listen_address`` (brackets for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
