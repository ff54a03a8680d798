"""An NBD export as a mirror target (``nbd://``, ``nbd+unix://``, ``nbds://``, ``nbds+unix://``).

A thin layer over :class:`mirrorfs.nbd.client.NBDClient` that adds what a *target* must promise
beyond one connection:

- ``connect()`` may be called again after a loss; each call opens a new connection. The first
  connection fixes the target's identity: its size (or the ``expected_size`` given) and the export
  name/description the server reports. A later connection that differs in either is refused with
  ``TargetFatalError`` and closed before anything is written: the server now exports something
  else, and writing the rest of a mirror onto it would corrupt it.
- Requests outside ``[0, size)`` are refused with ``TargetError(errno=EINVAL)``; reads are
  clipped at the end of the device.
- Every failure is a ``TargetError`` (see :mod:`mirrorfs.targets.base`); a lost connection is
  ``TargetRetryableError`` and leaves ``connected`` False until the next successful ``connect()``.
  A request waits at most ``timeout`` seconds (default 10 s) for its reply.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import os
import ssl

import trio

from mirrorfs.errors import TargetError, TargetFatalError, TargetRetryableError
from mirrorfs.nbd.client import DEFAULT_TIMEOUT, NBDClient
from mirrorfs.nbd.uri import parse_nbd_uri
from mirrorfs.targets.base import Target


class NBDTarget(Target):
    """A mirror target on an NBD server.

    Args:
        uri: the export's URI.
        expected_size: refuse an export of any other size (``None``: take the first one seen).
        timeout: seconds to connect, and the longest wait for a reply before the connection
            counts as lost.
        ssl_context: TLS context to use instead of the one the URI's ``tls-certificates`` makes.

    Raises:
        UsageError: the URI is malformed.
    """

    def __init__(self, uri: str, *, expected_size: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT, ssl_context: ssl.SSLContext | None = None) -> None:
        self.address = parse_nbd_uri(uri)
        self.description = self.address.uri
        self.timeout = timeout
        self._ssl_context = ssl_context
        self._size = expected_size
        self._identity: tuple[str | None, str | None] | None = None
        self._client: NBDClient | None = None
        self._connect_lock = trio.Lock()

    @property
    def connected(self) -> bool:
        return self._client is not None and not self._client.closed

    @property
    def size(self) -> int:
        if self._size is None:
            raise TargetError(f"size of {self.description} is not known before connect()")
        return self._size

    @property
    def client(self) -> NBDClient | None:
        """The current connection (for diagnostics and tests)."""
        return self._client

    async def connect(self) -> None:
        """(Re)connect; see the module docstring for what is checked.

        Raises:
            TargetRetryableError: the server is unreachable or went away during the handshake.
            TargetFatalError: refused export or TLS, read-only, different size or export.
        """
        async with self._connect_lock:
            old, self._client = self._client, None
            if old is not None:
                await old.close()
            client = await NBDClient.connect(self.address, timeout=self.timeout,
                                             tls=self._ssl_context)
            identity = (client.info.name, client.info.description)
            problem = None
            if self._size is not None and client.size != self._size and self._identity is None:
                # Never connected before: the size is the one the caller expects (the image's).
                problem = (f"{self.description} is {client.size} bytes, but {self._size} bytes "
                           f"are needed: give a target of the image's size")
            elif self._size is not None and client.size != self._size:
                problem = (f"{self.description} is {client.size} bytes but the target was "
                           f"{self._size} bytes: refusing to write to a different export")
            elif self._identity is not None and identity != self._identity:
                problem = (f"{self.description} now reports export {identity[0]!r} "
                           f"({identity[1] or 'no description'}) instead of {self._identity[0]!r} "
                           f"({self._identity[1] or 'no description'}): refusing to write to a "
                           f"different export")
            if problem is not None:
                await client.close()
                raise TargetFatalError(problem)
            self._size = client.size
            self._identity = identity
            self._client = client

    def _require(self) -> NBDClient:
        client = self._client
        if client is None or client.closed:
            raise TargetRetryableError(f"{self.description} is not connected")
        return client

    def _check_range(self, what: str, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise TargetError(f"{what} of {length} bytes at {offset} is outside "
                              f"{self.description} ({self.size} bytes)", errno=_errno.EINVAL)

    async def pread(self, offset: int, length: int) -> bytes:
        client = self._require()
        if offset < 0 or length < 0:
            self._check_range("read", offset, length)
        length = max(0, min(length, self.size - offset))
        return await client.pread(offset, length)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *,
                     fua: bool = False, direct: bool = False) -> None:
        # direct: the server decides its own caching
        client = self._require()
        self._check_range("write", offset, len(data))
        await client.pwrite(offset, data, fua=fua)

    async def write_zeroes(self, offset: int, length: int) -> None:
        client = self._require()
        self._check_range("write-zeroes", offset, length)
        await client.write_zeroes(offset, length)

    async def trim(self, offset: int, length: int) -> bool:
        """Discard a range where the server offers TRIM (contents become unspecified).

        Returns:
            Whether a TRIM was sent.
        """
        client = self._require()
        self._check_range("trim", offset, length)
        return await client.trim(offset, length)

    async def flush(self) -> None:
        await self._require().flush()

    def identity(self) -> str:
        """The URI as parsed (default port filled in), a UNIX socket by its real path."""
        if self.address.socket_path:
            real = os.path.realpath(self.address.socket_path)
            return dataclasses.replace(self.address, socket_path=real).uri
        return self.address.uri

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()
