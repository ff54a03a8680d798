"""NBD URI parsing: the forms docs/reference.md and libnbd name, and one-line errors for everything else."""

import pytest

from mirrorfs.errors import UsageError
from mirrorfs.nbd.uri import DEFAULT_PORT, NBDAddress, is_nbd_uri, parse_nbd_uri


@pytest.mark.parametrize("uri, expected", [
    ("nbd://example.com/disk", NBDAddress("tcp", "disk", host="example.com", port=DEFAULT_PORT)),
    ("nbd://example.com:10810/disk", NBDAddress("tcp", "disk", host="example.com", port=10810)),
    ("nbd://127.0.0.1", NBDAddress("tcp", "", host="127.0.0.1", port=DEFAULT_PORT)),
    ("nbd://127.0.0.1/", NBDAddress("tcp", "", host="127.0.0.1", port=DEFAULT_PORT)),
    ("nbd://[::1]:5000/a%20b/c", NBDAddress("tcp", "a b/c", host="::1", port=5000)),
    ("nbd+unix:///exp?socket=/run/nbd.sock",
     NBDAddress("unix", "exp", socket_path="/run/nbd.sock")),
    ("nbd+unix:///?socket=/s", NBDAddress("unix", "", socket_path="/s")),
    ("nbds://h/e?tls-certificates=/pki&tls-hostname=srv",
     NBDAddress("tcp", "e", host="h", port=DEFAULT_PORT, tls=True, tls_certificates="/pki",
                tls_hostname="srv")),
    ("nbds+unix:///e?socket=/s&tls-certificates=/pki",
     NBDAddress("unix", "e", socket_path="/s", tls=True, tls_certificates="/pki")),
])
def test_parse(uri, expected):
    assert parse_nbd_uri(uri) == expected
    assert is_nbd_uri(uri)


@pytest.mark.parametrize("uri, fragment", [
    ("/tmp/target.img", "not an NBD URI"),
    ("http://host/disk", "unknown NBD URI scheme 'http'"),
    ("nbd:///disk", "has no host"),
    ("nbd://host:99999/disk", "malformed NBD URI"),
    ("nbd://host:0/disk", "port 0"),
    ("nbd://host:abc/disk", "malformed NBD URI"),
    ("nbd+unix:///disk", "needs ?socket=PATH"),
    ("nbd+unix://host/disk?socket=/s", "takes no host"),
    ("nbd://host/disk?socket=/s", "unknown query key 'socket'"),
    ("nbd://host/disk?tls-certificates=/pki", "TLS keys need nbds://"),
    ("nbd+unix:///d?socket=/a&socket=/b", "more than once"),
    ("nbd://user:secret@host/disk", "user names and passwords are not supported"),
    ("nbd://host/disk#frag", "fragment"),
    ("nbds://host/disk?tls-certificates=", "empty tls-certificates"),
])
def test_bad_uris_are_refused_in_one_line(uri, fragment):
    with pytest.raises(UsageError) as info:
        parse_nbd_uri(uri)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_description_has_no_secrets_and_round_trips():
    a = parse_nbd_uri("nbds://10.0.0.1:7000/my%20disk?tls-certificates=/etc/pki&tls-hostname=x")
    assert a.uri == "nbds://10.0.0.1:7000/my%20disk"
    assert parse_nbd_uri(a.uri).export == "my disk"
    u = parse_nbd_uri("nbd+unix:///e?socket=/run/s")
    assert u.uri == "nbd+unix:///e?socket=/run/s"
    assert parse_nbd_uri(u.uri) == u
    assert parse_nbd_uri("nbd://[::1]/x").uri == "nbd://[::1]:10809/x"


def test_server_hostname_defaults():
    assert parse_nbd_uri("nbds://srv.example/e").server_hostname == "srv.example"
    assert parse_nbd_uri("nbds+unix:///e?socket=/s").server_hostname == "localhost"
    assert parse_nbd_uri("nbds+unix:///e?socket=/s&tls-hostname=n").server_hostname == "n"
    assert not is_nbd_uri("/var/lib/images/a.img")
