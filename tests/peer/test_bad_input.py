"""Hostile bytes at a running daemon's round protocol: each is refused with a log line, the daemon goes on."""

from __future__ import annotations

import socket
import struct

import msgpack
import numpy as np

from gossip.rounds import payload as dense
from peer.daemon import parse_address
from peer.worker.model import GPT, PRESETS
from transport.messages import encode_message, read_frame

SPEC = [(name, tuple(p.shape)) for name, p in GPT(PRESETS["tiny"]).named_parameters()]
SIZE = dense.spec_size(SPEC)


def request(address: tuple[str, int], raw: bytes, expect_reply: bool = True) -> dict | None:
    with socket.create_connection(address, timeout=15) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    if not expect_reply:
        assert data == b"", "the daemon answered a malformed request"
        return None
    (length,) = struct.unpack(">I", data[:4])
    return msgpack.unpackb(data[4 : 4 + length], raw=False)


def offer(payload: bytes, sender: str = "p-attacker") -> bytes:
    return encode_message(
        {"v": 1, "type": "offer", "run": "bad", "from": sender, "round": 1, "payload": payload}
    )


def test_malformed_requests_are_refused_and_the_daemon_keeps_running(start_peer):
    peer = start_peer(
        "target",
        "--run",
        "bad",
        "--listen",
        "127.0.0.1:0",
        "--rounds",
        "1000",
        "--inner-steps",
        "50",
        "--threads",
        "1",
    )
    address = parse_address(peer.wait_for(lambda e: e["event"] == "listening")["address"])
    peer.wait_for(lambda e: e["event"] == "worker")  # the daemon knows the model's shapes from here on

    # Frames that are not messages: the connection is closed without an answer.
    request(address, b"\xff\xff\xff\xff" + b"x" * 100, expect_reply=False)  # oversized length prefix
    request(address, struct.pack(">I", 1000) + b"\x81" * 10, expect_reply=False)  # truncated frame
    request(address, struct.pack(">I", 1) + b"\xc1", expect_reply=False)  # not msgpack
    request(
        address, encode_message({"v": 1, "type": "offer", "run": "other", "from": "x"}), expect_reply=False
    )

    values = np.zeros(SIZE, dtype=np.float32)
    wrong_shapes = [(name, (shape[0] + 1, *shape[1:])) for name, shape in SPEC]
    wrong_values = np.zeros(dense.spec_size(wrong_shapes), dtype=np.float32)
    with_nan = values.copy()
    with_nan[12345] = np.nan
    good = dense.encode(SPEC, values)
    hostile = {
        "wrong shapes": dense.encode(wrong_shapes, wrong_values),
        "NaN values": dense.encode(SPEC, with_nan),
        "truncated payload": good[: len(good) // 2],
        "lying header length": struct.pack(">I", 1 << 30) + good[4:],
    }
    for what, payload in hostile.items():
        reply = request(address, offer(payload))
        assert reply["type"] == "refuse" and "invalid payload" in reply["reason"], (what, reply)

    # Still alive and answering: a well-formed membership request gets the daemon's table back.
    table_request = encode_message({"v": 1, "type": "members", "run": "bad", "from": "p-friend", "table": []})
    reply = request(address, table_request)
    assert reply["type"] == "members" and any(m["peer_id"] == peer.events[0]["peer"] for m in reply["table"])
    assert peer.process.poll() is None

    log = peer.log_path.read_text()
    assert log.count("dropped a bad request") >= 3, peer.log_tail()
    assert "refused the payload of p-attacker" in log
    assert "non-finite" in log and "does not match the model" in log


def test_frame_reader_refuses_oversized_frames_before_reading_them():
    import asyncio

    from transport.messages import MessageError

    async def scenario() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(struct.pack(">I", 10_000_000))  # the body is never sent
        try:
            await read_frame(reader, max_bytes=1 << 20)
        except MessageError as error:
            assert "exceeds the limit" in str(error)
        else:
            raise AssertionError("an oversized frame was accepted")

    asyncio.run(scenario())
