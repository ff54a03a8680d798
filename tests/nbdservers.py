"""Real NBD servers for tests: qemu-nbd and nbdkit, on a UNIX socket or TCP 127.0.0.1.

Each context manager starts its own server process, waits (polling, with a deadline) until it
accepts connections, fails fast if the process dies, and in ``finally`` terminates, waits and if
need be kills that process only. Sockets live in a short private directory under /tmp (UNIX
socket paths are limited to 108 bytes), removed afterwards.

Also: :func:`make_tls_certs`, a CA + server + client certificates made with ``certtool``, laid
out as both qemu's ``tls-creds-x509`` (``ca-cert.pem server-cert.pem server-key.pem``) and
libnbd's ``tls-certificates`` (``ca-cert.pem client-cert.pem client-key.pem``) expect.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

START_TIMEOUT = 10.0

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # In the child before exec: SIGKILL when the test process dies, even by SIGKILL, so a
    # killed test run cannot leave a server behind (qemu-nbd has no --exit-with-parent).
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(family: int, addr: object) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(addr)
        except OSError:
            return False
        return True


class Server:
    """A running NBD server process started by a test."""

    def __init__(self, argv: list[str], *, uri: str, family: int, addr: object,
                 log: Path) -> None:
        self.argv = argv
        self.uri = uri
        self.family = family
        self.addr = addr
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the process and wait until it accepts connections."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            if _accepts(self.family, self.addr):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.argv[0]} did not accept connections within "
                                   f"{START_TIMEOUT} s")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the server (a crash, as the far side sees it) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.family == socket.AF_UNIX:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.addr)  # type: ignore[arg-type]

    def stop(self) -> None:
        """Terminate, wait, and kill if it does not go."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@contextlib.contextmanager
def _sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nbd", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _endpoint(transport: str, d: Path, export: str, tls: bool) -> tuple[list[str], list[str], str, int, object]:
    """(qemu-nbd args, nbdkit args, uri, family, addr)."""
    scheme = "nbds" if tls else "nbd"
    if transport == "unix":
        path = str(d / "s")
        return (["--socket", path], ["-U", path], f"{scheme}+unix:///{export}?socket={path}",
                socket.AF_UNIX, path)
    port = free_tcp_port()
    return (["-b", "127.0.0.1", "-p", str(port)], ["-i", "127.0.0.1", "-p", str(port)],
            f"{scheme}://127.0.0.1:{port}/{export}", socket.AF_INET, ("127.0.0.1", port))


@contextlib.contextmanager
def qemu_nbd(image: str | os.PathLike, *, transport: str = "unix", export: str = "disk",
             read_only: bool = False, fmt: str = "raw", discard: bool = True,
             tls_dir: str | os.PathLike | None = None, extra: list[str] = ()) -> Iterator[Server]:
    """Serve ``image`` with qemu-nbd (persistent, up to 8 clients).

    Args:
        image: the file to export.
        transport: ``"unix"`` or ``"tcp"`` (127.0.0.1, a free port).
        export: export name.
        read_only: ``-r``.
        fmt: image format.
        discard: ``--discard=unmap`` so WRITE_ZEROES/TRIM may punch holes.
        tls_dir: serve TLS with x509 credentials from this directory (client certs required).
    """
    def build(d: Path) -> Server:
        qargs, _, uri, family, addr = _endpoint(transport, d, export, tls_dir is not None)
        argv = ["qemu-nbd", "-f", fmt, "--persistent", "--shared=8", "--export-name", export,
                "--cache=writeback", *qargs]
        if discard:
            argv.append("--discard=unmap")
        if read_only:
            argv.append("-r")
        if tls_dir is not None:
            uri += f"&tls-certificates={tls_dir}" if "?" in uri else f"?tls-certificates={tls_dir}"
            argv += ["--object", f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server",
                     "--tls-creds", "tls0"]
        argv += [*extra, str(image)]
        return Server(argv, uri=uri, family=family, addr=addr, log=d / "log")

    with _sockdir() as d:
        for attempt in range(3):  # a free TCP port can be taken in between: retry
            server = build(d)
            try:
                server.start()
                break
            except RuntimeError:
                if transport != "tcp" or attempt == 2:
                    raise
        try:
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def nbdkit(image: str | os.PathLike, *, transport: str = "unix", filters: list[str] = (),
           params: list[str] = (), read_only: bool = False, plugin: str = "file",
           export: str = "") -> Iterator[Server]:
    """Serve ``image`` with ``nbdkit file`` (foreground, exits with the test process).

    Args:
        image: the file to export (``file=`` of the file plugin).
        transport: ``"unix"`` or ``"tcp"``.
        filters: filter names, e.g. ``["error"]``, ``["delay"]``.
        params: ``key=value`` parameters for the plugin and filters.
        read_only: ``-r``.
    """
    with _sockdir() as d:
        _, kargs, uri, family, addr = _endpoint(transport, d, export, False)
        argv = ["nbdkit", "-f", "--exit-with-parent", *kargs]
        if read_only:
            argv.append("-r")
        argv += [f"--filter={f}" for f in filters]
        argv += [plugin, f"file={image}" if plugin == "file" else str(image), *params]
        server = Server(argv, uri=uri, family=family, addr=addr, log=d / "log")
        server.start()
        try:
            yield server
        finally:
            server.stop()


def make_tls_certs(directory: str | os.PathLike, *, hostname: str = "localhost") -> Path:
    """Create a CA, a server certificate for ``hostname``/127.0.0.1 and a client certificate.

    Returns:
        The directory, holding ``ca-cert.pem ca-key.pem server-cert.pem server-key.pem
        client-cert.pem client-key.pem``.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["certtool", *args], check=True, capture_output=True)

    def template(name: str, text: str) -> str:
        p = d / f"{name}.info"
        p.write_text(text)
        return str(p)

    run("--generate-privkey", "--outfile", str(d / "ca-key.pem"))
    run("--generate-self-signed", "--load-privkey", str(d / "ca-key.pem"),
        "--template", template("ca", "cn = mirrorfs test CA\nca\ncert_signing_key\n"
                                     "expiration_days = 2\n"),
        "--outfile", str(d / "ca-cert.pem"))
    for role, extra in (("server", f"dns_name = {hostname}\nip_address = 127.0.0.1\n"
                                   "tls_www_server\n"),
                        ("client", "tls_www_client\n")):
        run("--generate-privkey", "--outfile", str(d / f"{role}-key.pem"))
        run("--generate-certificate", "--load-privkey", str(d / f"{role}-key.pem"),
            "--load-ca-certificate", str(d / "ca-cert.pem"),
            "--load-ca-privkey", str(d / "ca-key.pem"),
            "--template", template(role, f"cn = {hostname}\n{extra}encryption_key\n"
                                         "signing_key\nexpiration_days = 2\n"),
            "--outfile", str(d / f"{role}-cert.pem"))
    for p in d.glob("*-key.pem"):
        p.chmod(0o600)
    return d
