"""The sans-I/O NBD core, driven with canned server byte streams (no sockets, no trio)."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrorfs.errors import (
    LocalProtocolError,
    RemoteProtocolError,
    TargetFatalError,
    TargetRetryableError,
)
from mirrorfs.nbd import proto as p

SIZE = 1 << 20
ALL_FLAGS = (p.NBD_FLAG_HAS_FLAGS | p.NBD_FLAG_SEND_FLUSH | p.NBD_FLAG_SEND_FUA
             | p.NBD_FLAG_SEND_TRIM | p.NBD_FLAG_SEND_WRITE_ZEROES)


# ---- what a server sends ------------------------------------------------------------------
def greeting(flags=p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES) -> bytes:
    return struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, flags)


def opt_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QIII", p.NBD_OPT_REPLY_MAGIC, option, reply, len(payload)) + payload


def info_export(size=SIZE, flags=ALL_FLAGS) -> bytes:
    return opt_reply(p.NBD_OPT_GO, p.NBD_REP_INFO, struct.pack(">HQH", p.NBD_INFO_EXPORT, size, flags))


def info_block(mn=1, pref=4096, mx=1 << 25) -> bytes:
    return opt_reply(p.NBD_OPT_GO, p.NBD_REP_INFO, struct.pack(">HIII", p.NBD_INFO_BLOCK_SIZE, mn, pref, mx))


def simple(cookie, error=0, data=b"") -> bytes:
    return struct.pack(">IIQ", p.NBD_SIMPLE_REPLY_MAGIC, error, cookie) + data


def chunk(cookie, kind, payload=b"", done=False) -> bytes:
    return struct.pack(">IHHQI", p.NBD_STRUCTURED_REPLY_MAGIC, p.NBD_REPLY_FLAG_DONE if done else 0,
                       kind, cookie, len(payload)) + payload


def server_stream(*, structured=True, size=SIZE, flags=ALL_FLAGS, blocks=(1, 4096, 1 << 25)) -> bytes:
    out = greeting()
    out += opt_reply(p.NBD_OPT_STRUCTURED_REPLY, p.NBD_REP_ACK if structured else p.NBD_REP_ERR_UNSUP)
    out += info_export(size, flags)
    if blocks:
        out += info_block(*blocks)
    out += opt_reply(p.NBD_OPT_GO, p.NBD_REP_INFO, struct.pack(">H", p.NBD_INFO_NAME) + b"disk")
    return out + opt_reply(p.NBD_OPT_GO, p.NBD_REP_ACK)


def drain(conn: p.ClientConnection) -> list:
    events = []
    while True:
        ev = conn.next_event()
        if ev is p.NEED_DATA:
            return events
        events.append(ev)
        if isinstance(ev, p.ConnectionClosed):  # repeats forever, like h11's
            assert conn.next_event() == ev
            return events


def handshake(**kw) -> tuple[p.ClientConnection, p.Ready]:
    conn = p.ClientConnection("disk")
    conn.receive_data(server_stream(**kw))
    events = drain(conn)
    assert len(events) == 1 and isinstance(events[0], p.Ready)
    return conn, events[0]


# ---- handshake ------------------------------------------------------------------------------
def test_handshake_bytes_and_ready():
    conn = p.ClientConnection("disk")
    assert conn.next_event() is p.NEED_DATA and conn.data_to_send() == b""
    conn.receive_data(greeting())
    assert conn.next_event() is p.NEED_DATA
    sent = conn.data_to_send()
    # client flags, then NBD_OPT_STRUCTURED_REPLY (no data)
    assert sent[:4] == struct.pack(">I", p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES)
    assert sent[4:] == struct.pack(">QII", p.IHAVEOPT, p.NBD_OPT_STRUCTURED_REPLY, 0)
    conn.receive_data(opt_reply(p.NBD_OPT_STRUCTURED_REPLY, p.NBD_REP_ACK))
    assert conn.next_event() is p.NEED_DATA
    go = conn.data_to_send()
    payload = struct.pack(">I", 4) + b"disk" + struct.pack(">HHHH", 3, p.NBD_INFO_BLOCK_SIZE,
                                                            p.NBD_INFO_NAME, p.NBD_INFO_DESCRIPTION)
    assert go == struct.pack(">QII", p.IHAVEOPT, p.NBD_OPT_GO, len(payload)) + payload
    conn.receive_data(info_export() + info_block(512, 4096, 1 << 20)
                      + opt_reply(p.NBD_OPT_GO, p.NBD_REP_INFO, struct.pack(">H", 2) + b"a disk")
                      + opt_reply(p.NBD_OPT_GO, p.NBD_REP_INFO, struct.pack(">H", 99) + b"??")
                      + opt_reply(p.NBD_OPT_GO, p.NBD_REP_ACK))
    ready = conn.next_event()
    assert ready == p.Ready(size=SIZE, flags=ALL_FLAGS, structured_replies=True, min_block=512,
                            preferred_block=4096, max_block=1 << 20, description="a disk")
    assert conn.state == "transmission"


def test_no_zeroes_only_when_offered_and_structured_refused():
    conn = p.ClientConnection("")
    conn.receive_data(greeting(p.NBD_FLAG_FIXED_NEWSTYLE))
    drain(conn)
    assert conn.data_to_send()[:4] == struct.pack(">I", p.NBD_FLAG_C_FIXED_NEWSTYLE)
    conn.receive_data(opt_reply(p.NBD_OPT_STRUCTURED_REPLY, p.NBD_REP_ERR_UNSUP)
                      + info_export() + opt_reply(p.NBD_OPT_GO, p.NBD_REP_ACK))
    (ready,) = drain(conn)
    assert ready.structured_replies is False
    assert (ready.min_block, ready.max_block) == (1, p.DEFAULT_MAX_BLOCK)


@pytest.mark.parametrize("reply, message, exc", [
    (p.NBD_REP_ERR_UNKNOWN, b"export 'disk' not present", TargetFatalError),
    (p.NBD_REP_ERR_POLICY, b"", TargetFatalError),
    (p.NBD_REP_ERR_TLS_REQD, b"", TargetFatalError),
    (p.NBD_REP_ERR_SHUTDOWN, b"", TargetRetryableError),
])
def test_go_refusals_are_clear(reply, message, exc):
    conn = p.ClientConnection("disk")
    conn.receive_data(greeting() + opt_reply(p.NBD_OPT_STRUCTURED_REPLY, p.NBD_REP_ACK)
                      + opt_reply(p.NBD_OPT_GO, reply, message))
    with pytest.raises(exc) as info:
        drain(conn)
    text = str(info.value)
    assert "export 'disk' refused" in text
    assert {p.NBD_REP_ERR_UNKNOWN: "no such export", p.NBD_REP_ERR_POLICY: "policy",
            p.NBD_REP_ERR_TLS_REQD: "nbds://", p.NBD_REP_ERR_SHUTDOWN: "shutting down"}[reply] in text
    assert message.decode() in text
    assert conn.state == "closed"


def test_read_only_export_refused_unless_allowed():
    flags = p.NBD_FLAG_HAS_FLAGS | p.NBD_FLAG_READ_ONLY
    conn = p.ClientConnection("disk")
    conn.receive_data(server_stream(flags=flags))
    with pytest.raises(TargetFatalError, match="export 'disk' is read-only"):
        drain(conn)
    conn = p.ClientConnection("disk", allow_read_only=True)
    conn.receive_data(server_stream(flags=flags))
    (ready,) = drain(conn)
    with pytest.raises(LocalProtocolError, match="read-only"):
        conn.send_request(p.NBD_CMD_WRITE, 0, 1, data=b"x")
    conn.send_request(p.NBD_CMD_READ, 0, 1)


def test_starttls_comes_first_and_blocks_clear_text():
    conn = p.ClientConnection("disk", tls=True)
    conn.receive_data(greeting())
    assert drain(conn) == []
    sent = conn.data_to_send()
    assert sent[4:] == struct.pack(">QII", p.IHAVEOPT, p.NBD_OPT_STARTTLS, 0)
    conn.receive_data(opt_reply(p.NBD_OPT_STARTTLS, p.NBD_REP_ACK))
    assert drain(conn) == [p.StartTLS()]
    assert conn.data_to_send() == b""
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")
    conn.tls_started()
    assert conn.data_to_send() == struct.pack(">QII", p.IHAVEOPT, p.NBD_OPT_STRUCTURED_REPLY, 0)


def test_starttls_refused():
    conn = p.ClientConnection("disk", tls=True)
    conn.receive_data(greeting() + opt_reply(p.NBD_OPT_STARTTLS, p.NBD_REP_ERR_POLICY))
    with pytest.raises(TargetFatalError, match="TLS refused"):
        drain(conn)


@pytest.mark.parametrize("data, fragment", [
    (b"NOTNBD!!" + b"\0" * 10, "not an NBD server"),
    (struct.pack(">QQH", p.NBDMAGIC, 0x00420281861253, 0), "oldstyle"),
    (struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 0), "fixed newstyle"),
    (greeting() + opt_reply(p.NBD_OPT_GO, p.NBD_REP_ACK), "reply to option 7 while waiting for 8"),
    (greeting() + struct.pack(">QIII", 1, 8, 1, 0), "bad option reply magic"),
])
def test_broken_handshakes(data, fragment):
    conn = p.ClientConnection("disk")
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=fragment):
        drain(conn)


def test_eof_during_handshake_is_retryable():
    conn = p.ClientConnection("disk")
    conn.receive_data(greeting()[:5])
    conn.receive_data(b"")
    with pytest.raises(TargetRetryableError, match="closed the connection during the handshake"):
        drain(conn)


# ---- transmission ---------------------------------------------------------------------------
def test_request_encoding_and_simple_replies():
    conn, _ = handshake(structured=False)
    c1, chunks = conn.send_request(p.NBD_CMD_WRITE, 4096, 3, data=b"abc", flags=p.NBD_CMD_FLAG_FUA)
    assert chunks == [struct.pack(">IHHQQI", p.NBD_REQUEST_MAGIC, 1, p.NBD_CMD_WRITE, c1, 4096, 3), b"abc"]
    c2, chunks = conn.send_request(p.NBD_CMD_READ, 0, 5)
    assert chunks == [struct.pack(">IHHQQI", p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_READ, c2, 0, 5)]
    c3, _ = conn.send_request(p.NBD_CMD_FLUSH)
    c4, _ = conn.send_request(p.NBD_CMD_READ, 10, 2)
    assert len({c1, c2, c3, c4}) == 4 and conn.pending == 4
    # out of order; an error on a read carries no data
    conn.receive_data(simple(c2, data=b"hello") + simple(c1) + simple(c4, error=p.NBD_EIO)
                      + simple(c3, error=p.NBD_ENOSPC))
    events = drain(conn)
    assert events == [p.Reply(c2, p.NBD_CMD_READ, 0, b"hello"),
                      p.Reply(c1, p.NBD_CMD_WRITE), p.Reply(c4, p.NBD_CMD_READ, errno.EIO),
                      p.Reply(c3, p.NBD_CMD_FLUSH, errno.ENOSPC)]
    assert conn.pending == 0


def test_structured_read_assembles_data_and_holes():
    conn, _ = handshake()
    cookie, _ = conn.send_request(p.NBD_CMD_READ, 1000, 30)
    conn.receive_data(chunk(cookie, p.NBD_REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", 1010, 10))
                      + chunk(cookie, p.NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 1000) + b"A" * 10)
                      + chunk(cookie, p.NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 1020) + b"B" * 10)
                      + chunk(cookie, p.NBD_REPLY_TYPE_NONE, done=True))
    (reply,) = drain(conn)
    assert reply.data == b"A" * 10 + b"\0" * 10 + b"B" * 10 and reply.error == 0
    assert type(reply.data) is bytes
    # one chunk for the whole request (the usual case), data or hole
    c1, _ = conn.send_request(p.NBD_CMD_READ, 0, 4)
    c2, _ = conn.send_request(p.NBD_CMD_READ, 4, 4)
    conn.receive_data(chunk(c1, p.NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 0) + b"wxyz", done=True)
                      + chunk(c2, p.NBD_REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", 4, 4), done=True))
    r1, r2 = drain(conn)
    assert (r1.data, r2.data) == (b"wxyz", bytes(4))
    assert type(r1.data) is bytes and type(r2.data) is bytes


def test_structured_errors():
    conn, _ = handshake()
    c1, _ = conn.send_request(p.NBD_CMD_WRITE, 0, 1, data=b"x")
    c2, _ = conn.send_request(p.NBD_CMD_READ, 0, 8)
    msg = b"disk full"
    conn.receive_data(chunk(c1, p.NBD_REPLY_TYPE_ERROR, struct.pack(">IH", p.NBD_ENOSPC, len(msg)) + msg,
                            done=True)
                      + chunk(c2, p.NBD_REPLY_TYPE_ERROR_OFFSET,
                              struct.pack(">IH", p.NBD_EIO, 3) + b"bad" + struct.pack(">Q", 4), done=True))
    r1, r2 = drain(conn)
    assert (r1.error, r1.message, r1.data) == (errno.ENOSPC, "disk full", None)
    assert (r2.error, r2.message, r2.data) == (errno.EIO, "bad (at offset 4)", None)


def test_read_reply_must_cover_the_request():
    conn, _ = handshake()
    cookie, _ = conn.send_request(p.NBD_CMD_READ, 0, 8)
    conn.receive_data(chunk(cookie, p.NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 0) + b"1234", done=True))
    with pytest.raises(RemoteProtocolError, match="covers 4 of 8"):
        drain(conn)


def _data(offset: int, payload: bytes) -> bytes:
    return struct.pack(">Q", offset) + payload


def _hole(offset: int, length: int) -> bytes:
    return struct.pack(">QI", offset, length)


@pytest.mark.parametrize("chunks", [
    # the second chunk repeats the first half: the lengths add up, [4, 8) is never sent
    [(p.NBD_REPLY_TYPE_OFFSET_DATA, _data(0, b"abcd")), (p.NBD_REPLY_TYPE_OFFSET_DATA, _data(0, b"wxyz"))],
    [(p.NBD_REPLY_TYPE_OFFSET_DATA, _data(0, b"abcd")), (p.NBD_REPLY_TYPE_OFFSET_HOLE, _hole(2, 4))],
    [(p.NBD_REPLY_TYPE_OFFSET_HOLE, _hole(4, 4)), (p.NBD_REPLY_TYPE_OFFSET_DATA, _data(2, b"abcd"))],
    [(p.NBD_REPLY_TYPE_OFFSET_HOLE, _hole(0, 2)), (p.NBD_REPLY_TYPE_OFFSET_HOLE, _hole(4, 2)),
     (p.NBD_REPLY_TYPE_OFFSET_DATA, _data(1, b"abcd"))],
])
def test_overlapping_read_chunks_are_refused(chunks):
    conn, _ = handshake()
    cookie, _ = conn.send_request(p.NBD_CMD_READ, 0, 8)
    conn.receive_data(b"".join(chunk(cookie, kind, payload, done=i == len(chunks) - 1)
                               for i, (kind, payload) in enumerate(chunks)))
    with pytest.raises(RemoteProtocolError, match="overlap"):
        drain(conn)
    assert conn.state == "closed"


def test_read_chunks_in_any_order_that_tile_the_request():
    conn, _ = handshake()
    cookie, _ = conn.send_request(p.NBD_CMD_READ, 100, 12)
    conn.receive_data(chunk(cookie, p.NBD_REPLY_TYPE_OFFSET_DATA, _data(108, b"CCCC"))
                      + chunk(cookie, p.NBD_REPLY_TYPE_OFFSET_DATA, _data(100, b"AA"))
                      + chunk(cookie, p.NBD_REPLY_TYPE_OFFSET_HOLE, _hole(104, 4))
                      + chunk(cookie, p.NBD_REPLY_TYPE_OFFSET_DATA, _data(102, b"BB"), done=True))
    (reply,) = drain(conn)
    assert reply.data == b"AABB" + bytes(4) + b"CCCC" and reply.error == 0


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_read_chunks_must_tile_the_request_exactly(data):
    """Any tiling in any order reads back right; any set of chunks that misses a byte (however
    their lengths add up) is refused."""
    length = 64
    cuts = sorted(data.draw(st.sets(st.integers(1, length - 1), max_size=12)))
    pieces = list(zip([0, *cuts], [*cuts, length]))
    if data.draw(st.booleans(), label="break the tiling"):
        i = data.draw(st.integers(0, len(pieces) - 1))
        a, b = pieces[i]
        shift = data.draw(st.integers(-a, length - b).filter(bool)) if (a, b) != (0, length) else 0
        if not shift:
            return
        pieces[i] = (a + shift, b + shift)  # same length, now overlapping a neighbour
    order = data.draw(st.permutations(pieces))
    holes = data.draw(st.lists(st.booleans(), min_size=len(order), max_size=len(order)))
    expect = bytearray(length)
    stream = b""
    conn, _ = handshake()
    cookie, _ = conn.send_request(p.NBD_CMD_READ, 0, length)
    for n, ((a, b), hole) in enumerate(zip(order, holes)):
        done = n == len(order) - 1
        if hole:
            stream += chunk(cookie, p.NBD_REPLY_TYPE_OFFSET_HOLE, _hole(a, b - a), done=done)
        else:
            stream += chunk(cookie, p.NBD_REPLY_TYPE_OFFSET_DATA, _data(a, bytes(range(a + 1, b + 1))), done=done)
            expect[a:b] = range(a + 1, b + 1)
    conn.receive_data(stream)
    if sorted(order) == list(zip([0, *cuts], [*cuts, length])):
        (reply,) = drain(conn)
        assert reply.data == expect
    else:
        with pytest.raises(RemoteProtocolError, match="overlap"):
            drain(conn)


@pytest.mark.parametrize("make, fragment", [
    (lambda c: simple(c + 100), "unknown cookie"),
    (lambda c: b"\xde\xad\xbe\xef" + b"\0" * 16, "bad reply magic"),
    (lambda c: chunk(c, p.NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 6) + b"xyz", done=True),
     "outside the requested range"),
    (lambda c: chunk(c, 77, b"", done=True), "unexpected reply chunk type"),
    (lambda c: chunk(c, p.NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 0) + b"12345678")
     + chunk(c, p.NBD_REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", 0, 4), done=True), "overlap"),
])
def test_remote_protocol_errors(make, fragment):
    conn, _ = handshake()
    cookie, _ = conn.send_request(p.NBD_CMD_READ, 0, 8)
    conn.receive_data(make(cookie))
    with pytest.raises(RemoteProtocolError, match=fragment):
        drain(conn)
    assert conn.state == "closed"


def test_local_protocol_errors_change_nothing():
    conn, _ = handshake(flags=p.NBD_FLAG_HAS_FLAGS, blocks=(512, 4096, 65536))
    for args, kw, fragment in [
        ((p.NBD_CMD_TRIM, 0, 512), {}, "does not offer trim"),
        ((p.NBD_CMD_WRITE_ZEROES, 0, 512), {}, "does not offer write-zeroes"),
        ((p.NBD_CMD_FLUSH,), {}, "does not offer flush"),
        ((p.NBD_CMD_WRITE, 0, 512), {"data": b"x" * 512, "flags": p.NBD_CMD_FLAG_FUA}, "FUA"),
        ((p.NBD_CMD_READ, SIZE - 512, 1024), {}, "outside the export"),
        ((p.NBD_CMD_READ, 0, 1 << 17), {}, "exceeds the server's maximum"),
        ((p.NBD_CMD_READ, 100, 512), {}, "not aligned"),
        ((p.NBD_CMD_READ, 512, 100), {}, "not aligned"),
        ((p.NBD_CMD_READ, SIZE - 100, 100), {}, "not aligned"),
        ((p.NBD_CMD_WRITE, 0, 512), {"data": b"x"}, "does not match"),
    ]:
        with pytest.raises(LocalProtocolError, match=fragment):
            conn.send_request(*args, **kw)
    assert conn.pending == 0
    cookie, _ = conn.send_request(p.NBD_CMD_READ, 512, 512)
    assert cookie == 1


def test_forgotten_request_is_parsed_and_dropped():
    conn, _ = handshake(structured=False)
    c1, _ = conn.send_request(p.NBD_CMD_READ, 0, 4)
    c2, _ = conn.send_request(p.NBD_CMD_READ, 4, 4)
    conn.forget(c1)
    conn.receive_data(simple(c1, data=b"1111") + simple(c2, data=b"2222"))
    assert drain(conn) == [p.Reply(c2, p.NBD_CMD_READ, 0, b"2222")]


def test_eof_in_transmission():
    conn, _ = handshake()
    conn.send_request(p.NBD_CMD_READ, 0, 4)
    conn.receive_data(b"")
    assert drain(conn) == [p.ConnectionClosed()]
    conn, _ = handshake()
    conn.send_request(p.NBD_CMD_READ, 0, 4)
    conn.receive_data(b"\x67\x44")
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a reply"):
        drain(conn)


def test_disconnect_and_abort_bytes():
    conn, _ = handshake()
    assert conn.abort_bytes() == struct.pack(">IHHQQI", p.NBD_REQUEST_MAGIC, 0, p.NBD_CMD_DISC, 0, 0, 0)
    conn = p.ClientConnection("x")
    conn.receive_data(greeting())
    drain(conn)
    assert conn.abort_bytes() == struct.pack(">QII", p.IHAVEOPT, p.NBD_OPT_ABORT, 0)


def test_error_value_mapping():
    assert p.nbd_error_to_errno(p.NBD_EPERM) == errno.EPERM
    assert p.nbd_error_to_errno(p.NBD_ENOSPC) == errno.ENOSPC
    assert p.nbd_error_to_errno(p.NBD_ESHUTDOWN) == errno.ESHUTDOWN
    assert p.nbd_error_to_errno(12345) == errno.EIO


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_fragmentation_gives_the_same_events(data):
    """Whatever the TCP segmentation, the same events come out."""
    stream = server_stream()
    conn = p.ClientConnection("disk")
    # handshake, in random pieces
    events = []
    pos = 0
    while pos < len(stream):
        n = data.draw(st.integers(1, 64))
        conn.receive_data(stream[pos:pos + n])
        pos += n
        events += drain(conn)
    assert [type(e) for e in events] == [p.Ready]
    cookies = [conn.send_request(p.NBD_CMD_READ, i * 64, 64)[0] for i in range(3)]
    replies = (chunk(cookies[1], p.NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 64) + b"b" * 64, done=True)
               + chunk(cookies[0], p.NBD_REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", 0, 64), done=True)
               + chunk(cookies[2], p.NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 128) + b"c" * 32)
               + chunk(cookies[2], p.NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 160) + b"d" * 32, done=True))
    got = []
    pos = 0
    while pos < len(replies):
        n = data.draw(st.integers(1, 200))
        conn.receive_data(replies[pos:pos + n])
        pos += n
        got += drain(conn)
    assert [(r.cookie, bytes(r.data)) for r in got] == [
        (cookies[1], b"b" * 64), (cookies[0], b"\0" * 64), (cookies[2], b"c" * 32 + b"d" * 32)]


def test_unaligned_tail_of_an_odd_sized_export_is_allowed():
    conn, _ = handshake(size=SIZE + 100, blocks=(512, 4096, 65536))
    conn.send_request(p.NBD_CMD_READ, SIZE, 100)
    conn.send_request(p.NBD_CMD_WRITE, SIZE - 512, 612, data=b"x" * 612)
    with pytest.raises(LocalProtocolError, match="not aligned"):
        conn.send_request(p.NBD_CMD_READ, SIZE + 50, 50)
