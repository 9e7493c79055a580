import pytest

from shoal.transport.errors import LimitError, ProtocolError, StreamClosedError
from shoal.transport.yamux import (
    FLAG_SYN,
    HEADER,
    INITIAL_WINDOW,
    TYPE_DATA,
    TYPE_WINDOW_UPDATE,
    DataReceived,
    GoAwayReceived,
    PongReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
    YamuxSession,
)

WINDOW = 1024 * 1024


def pair(**kwargs):
    return YamuxSession(is_client=True, window=WINDOW, **kwargs), YamuxSession(
        is_client=False, window=WINDOW, **kwargs
    )


def pump(src, dst, chunk=None):
    """Move src's queued frames to dst, optionally re-split into `chunk`-byte reads; returns dst's events."""
    blob = b"".join(bytes(f) for f in src.data_to_send())
    events = []
    step = chunk or max(1, len(blob))
    for pos in range(0, len(blob), step):
        events.extend(dst.receive_data(blob[pos : pos + step]))
    return events


def received(events, stream_id):
    return b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id)


@pytest.mark.parametrize("chunk", [None, 1, 5, 13, 4096])
def test_stream_data_and_half_close_survive_any_read_split(chunk):
    client, server = pair()
    sid = client.open_stream()
    payload = bytes(range(256)) * 1000
    assert client.send_data(sid, payload) == len(payload)
    client.send_fin(sid)
    events = pump(client, server, chunk)
    assert isinstance(events[0], StreamOpened) and events[0].stream_id == sid
    assert received(events, sid) == payload
    assert isinstance(events[-1], StreamEnded)
    # Half-closed: the server can still answer.
    assert server.send_data(sid, b"reply") == 5
    server.send_fin(sid)
    back = pump(server, client, chunk)
    assert received(back, sid) == b"reply" and isinstance(back[-1], StreamEnded)
    assert client.stream_count == server.stream_count == 0


def test_sender_never_exceeds_the_window_and_reader_consumption_reopens_it():
    client, server = pair()
    sid = client.open_stream()
    pump(client, server)
    pump(server, client)
    assert client.send_window(sid) == INITIAL_WINDOW
    assert client.send_data(sid, b"x" * (3 * WINDOW)) == INITIAL_WINDOW  # the rest must wait
    assert client.send_data(sid, b"more") == 0
    events = pump(client, server)
    assert len(received(events, sid)) == INITIAL_WINDOW
    # Nothing is granted back while the reader does not consume: a paused reader just pauses the writer.
    assert pump(server, client) == []
    server.consumed(sid, INITIAL_WINDOW // 2)
    events = pump(server, client)
    assert any(isinstance(e, WindowUpdated) for e in events)
    # Half the window came back, and the window doubled because the reader keeps up.
    assert client.send_window(sid) == INITIAL_WINDOW // 2 + INITIAL_WINDOW


def test_window_grows_to_the_maximum_only_while_the_reader_drains_it():
    client, server = pair()
    sid = client.open_stream()
    pump(client, server)
    total = 0
    for _ in range(40):
        sent = client.send_data(sid, b"y" * (4 * WINDOW))
        total += sent
        events = pump(client, server)
        server.consumed(sid, len(received(events, sid)))
        pump(server, client)
        assert server._streams[sid].window <= WINDOW
    assert server._streams[sid].window == WINDOW
    assert client.send_window(sid) <= WINDOW
    assert total > 4 * WINDOW


def test_a_reader_expecting_a_transfer_opens_the_window_for_it_at_once():
    # A transfer of known length read as it comes (a round's payload, a weights span): the reader grants
    # it whole in one window update instead of doubling the window a round trip at a time, up to the
    # configured maximum; data already sent stays counted, and flow control still holds beyond it.
    client, server = pair()
    sid = client.open_stream()
    assert client.send_data(sid, b"a" * 1000) == 1000
    pump(client, server)
    server.expect(sid, 600 * 1024)
    pump(server, client)
    assert client.send_window(sid) == 600 * 1024 - 1000
    assert client.send_data(sid, b"b" * WINDOW) == 600 * 1024 - 1000  # exactly what was granted
    events = pump(client, server)
    assert len(received(events, sid)) == 600 * 1024 - 1000
    server.consumed(sid, 600 * 1024)  # the reader drains it: the window keeps its size, and grows on
    pump(server, client)
    assert 600 * 1024 <= client.send_window(sid) <= WINDOW
    # Never more than the maximum, and never less than what is already granted.
    other = client.open_stream()
    pump(client, server)
    server.expect(other, 10 * WINDOW)
    server.expect(other, 1)
    pump(server, client)
    assert client.send_window(other) == WINDOW
    header = HEADER.pack(0, TYPE_DATA, 0, other, WINDOW + 1)
    with pytest.raises(ProtocolError):
        server.receive_data(header)


def test_peer_ignoring_flow_control_is_a_protocol_error():
    client, server = pair()
    sid = client.open_stream()
    pump(client, server)
    header = HEADER.pack(0, TYPE_DATA, 0, sid, WINDOW + 1)
    with pytest.raises(ProtocolError, match="flow control"):
        server.receive_data(header)


def test_reset_reaches_the_peer_and_frees_the_stream():
    client, server = pair()
    sid = client.open_stream()
    client.send_data(sid, b"abc")
    pump(client, server)
    server.reset_stream(sid)
    events = pump(server, client)
    assert events[-1] == StreamReset(sid)
    assert client.stream_count == server.stream_count == 0
    with pytest.raises(Exception, match="reset or closed"):
        client.send_data(sid, b"late")


def test_writing_after_fin_is_refused():
    client, _ = pair()
    sid = client.open_stream()
    client.send_fin(sid)
    with pytest.raises(StreamClosedError):
        client.send_data(sid, b"x")


def test_stream_limit_answers_syn_with_reset():
    client = YamuxSession(is_client=True, window=WINDOW, max_streams=100)
    server = YamuxSession(is_client=False, window=WINDOW, max_streams=2)
    ids = [client.open_stream() for _ in range(3)]
    events = pump(client, server)
    assert [e.stream_id for e in events if isinstance(e, StreamOpened)] == ids[:2]
    back = pump(server, client)
    assert StreamReset(ids[2]) in back


def test_local_stream_limit():
    client = YamuxSession(is_client=True, window=WINDOW, max_streams=1)
    client.open_stream()
    with pytest.raises(LimitError):
        client.open_stream()


def test_ping_is_answered_and_go_away_is_reported():
    client, server = pair()
    opaque = client.ping()
    pump(client, server)
    assert pump(server, client) == [PongReceived(opaque)]
    server.go_away()
    assert pump(server, client) == [GoAwayReceived(0)]
    with pytest.raises(LimitError):
        client.open_stream()


def test_syn_with_wrong_parity_or_duplicate_is_a_protocol_error():
    server = YamuxSession(is_client=False, window=WINDOW)
    with pytest.raises(ProtocolError, match="parity"):
        server.receive_data(HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_SYN, 2, 0))
    server = YamuxSession(is_client=False, window=WINDOW)
    server.receive_data(HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))
    with pytest.raises(ProtocolError, match="already open"):
        server.receive_data(HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))


def test_initial_window_is_the_spec_default_until_the_peer_raises_it():
    client, _ = pair()
    sid = client.open_stream()
    assert client.send_data(sid, b"x" * (INITIAL_WINDOW + 10)) == INITIAL_WINDOW
