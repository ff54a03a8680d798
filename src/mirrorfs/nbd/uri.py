"""NBD URIs: parse the forms docs/reference.md names into an :class:`NBDAddress`.

Accepted (the names libnbd uses):

- ``nbd://HOST[:PORT]/EXPORT``: TCP, port 10809 by default; the export may be empty.
- ``nbd+unix:///EXPORT?socket=PATH``: a UNIX socket; the host part must be empty.
- ``nbds://...`` and ``nbds+unix://...``: the same over TLS (``NBD_OPT_STARTTLS`` + x509), with
  the optional query keys ``tls-certificates=DIR`` (``ca-cert.pem``, and optionally
  ``client-cert.pem`` + ``client-key.pem``) and ``tls-hostname=NAME`` (the name the server's
  certificate must carry; default: the URI's host, or ``localhost`` for a UNIX socket).

The export name is percent-decoded. Anything else is refused with a one-line ``UsageError``
before any connection is attempted. This module does no I/O.
"""

from __future__ import annotations

import dataclasses
import urllib.parse

from mirrorfs.errors import UsageError

#: IANA port of NBD
DEFAULT_PORT = 10809

_SCHEMES = {
    "nbd": ("tcp", False),
    "nbds": ("tcp", True),
    "nbd+unix": ("unix", False),
    "nbds+unix": ("unix", True),
}
_TLS_KEYS = ("tls-certificates", "tls-hostname")


@dataclasses.dataclass(frozen=True)
class NBDAddress:
    """Where an NBD export is and how to talk to it.

    Attributes:
        transport: ``"tcp"`` or ``"unix"``.
        export: the export name (may be empty).
        host: TCP host (``None`` for UNIX sockets).
        port: TCP port (``None`` for UNIX sockets).
        socket_path: the UNIX socket path (``None`` for TCP).
        tls: whether to negotiate TLS (``nbds`` schemes).
        tls_certificates: directory with ``ca-cert.pem`` [``client-cert.pem``, ``client-key.pem``].
        tls_hostname: the name to verify the server certificate against.
    """

    transport: str
    export: str = ""
    host: str | None = None
    port: int | None = None
    socket_path: str | None = None
    tls: bool = False
    tls_certificates: str | None = None
    tls_hostname: str | None = None

    @property
    def server_hostname(self) -> str:
        """The name the server's TLS certificate is verified against."""
        if self.tls_hostname:
            return self.tls_hostname
        return self.host if self.transport == "tcp" and self.host else "localhost"

    @property
    def uri(self) -> str:
        """The URI without secrets (for status output, events and error messages)."""
        scheme = ("nbds" if self.tls else "nbd") + ("+unix" if self.transport == "unix" else "")
        export = urllib.parse.quote(self.export, safe="/:@")
        if self.transport == "unix":
            return f"{scheme}:///{export}?socket={self.socket_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{export}"

    def __str__(self) -> str:
        return self.uri


def is_nbd_uri(text: str) -> bool:
    """True if ``text`` looks like an NBD URI (so a target is not a local path)."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in _SCHEMES


def parse_nbd_uri(text: str) -> NBDAddress:
    """Parse an NBD URI.

    Args:
        text: ``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH`` or their TLS
            variants ``nbds://``, ``nbds+unix://``.

    Returns:
        The parsed address.

    Raises:
        UsageError: the URI is malformed, uses an unknown scheme or an unknown query key.
    """
    if not isinstance(text, str) or "://" not in text:
        raise UsageError(f"not an NBD URI: {text!r} (expected nbd://HOST[:PORT]/EXPORT or "
                         f"nbd+unix:///EXPORT?socket=PATH)")
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"malformed NBD URI {text!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise UsageError(f"unknown NBD URI scheme {parts.scheme!r} in {text!r} "
                         f"(use one of: {', '.join(_SCHEMES)})")
    transport, tls = _SCHEMES[scheme]
    if parts.fragment:
        raise UsageError(f"NBD URI {text!r} must not have a fragment (#...)")
    if parts.username is not None or parts.password is not None:
        raise UsageError(f"NBD URI {text!r}: user names and passwords are not supported")
    try:
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    except ValueError as exc:
        raise UsageError(f"malformed query in NBD URI {text!r}: {exc}") from None
    for key, values in query.items():
        if len(values) != 1:
            raise UsageError(f"NBD URI {text!r}: query key {key!r} given more than once")
    allowed = (("socket",) if transport == "unix" else ()) + (_TLS_KEYS if tls else ())
    for key in query:
        if key not in allowed:
            hint = " (TLS keys need nbds:// or nbds+unix://)" if key in _TLS_KEYS else ""
            raise UsageError(f"NBD URI {text!r}: unknown query key {key!r}{hint}")
    path = parts.path
    if path and not path.startswith("/"):
        raise UsageError(f"malformed NBD URI {text!r}: the export must follow a '/'")
    export = urllib.parse.unquote(path[1:]) if path else ""
    if len(export.encode()) > 4096:
        raise UsageError(f"NBD URI {text!r}: export name longer than 4096 bytes")
    certs = query.get("tls-certificates", [None])[0]
    tls_host = query.get("tls-hostname", [None])[0]
    if certs == "" or tls_host == "":
        raise UsageError(f"NBD URI {text!r}: empty tls-certificates or tls-hostname")
    if transport == "unix":
        if parts.netloc:
            raise UsageError(f"NBD URI {text!r}: {scheme}:// takes no host "
                             f"(write {scheme}:///EXPORT?socket=PATH)")
        sock = query.get("socket", [""])[0]
        if not sock:
            raise UsageError(f"NBD URI {text!r}: {scheme}:// needs ?socket=PATH")
        return NBDAddress("unix", export, socket_path=sock, tls=tls,
                          tls_certificates=certs, tls_hostname=tls_host)
    host = parts.hostname
    if not host:
        raise UsageError(f"NBD URI {text!r} has no host (expected {scheme}://HOST[:PORT]/EXPORT)")
    if port == 0:
        raise UsageError(f"NBD URI {text!r}: port 0 is not a valid port")
    return NBDAddress("tcp", export, host=host, port=port or DEFAULT_PORT, tls=tls,
                      tls_certificates=certs, tls_hostname=tls_host)
