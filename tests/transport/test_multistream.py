import pytest

from shoal.transport.errors import NegotiationError, ProtocolError
from shoal.transport.multistream import (
    MAX_MESSAGE_LENGTH,
    MAX_PROPOSALS,
    MultistreamDialer,
    MultistreamListener,
    encode_message,
)
from shoal.transport.varint import encode_uvarint


def negotiate(proposals, supported, chunk=None):
    dialer, listener = MultistreamDialer(proposals), MultistreamListener(supported)
    for _ in range(20):
        out = dialer.data_to_send()
        for pos in range(0, len(out), chunk or max(1, len(out))):
            listener.receive_data(out[pos : pos + (chunk or len(out))])
        back = listener.data_to_send()
        for pos in range(0, len(back), chunk or max(1, len(back))):
            dialer.receive_data(back[pos : pos + (chunk or len(back))])
        if dialer.done:
            break
    return dialer, listener


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_first_common_protocol_is_selected(chunk):
    dialer, listener = negotiate(["/a/2", "/a/1"], ["/a/1", "/b"], chunk)
    assert dialer.selected == listener.selected == "/a/1"


def test_wire_format_matches_the_spec():
    assert encode_message("/multistream/1.0.0") == b"\x13/multistream/1.0.0\n"
    assert MultistreamDialer(["/noise"]).data_to_send() == b"\x13/multistream/1.0.0\n\x07/noise\n"


def test_no_common_protocol_is_an_error():
    with pytest.raises(NegotiationError, match="none of the protocols"):
        negotiate(["/x"], ["/y"])


def test_bytes_after_agreement_are_kept_for_the_protocol():
    listener = MultistreamListener(["/p"])
    listener.receive_data(encode_message("/multistream/1.0.0") + encode_message("/p") + b"payload")
    assert listener.selected == "/p" and listener.unused_data == b"payload"


def test_a_lazy_dialers_first_bytes_may_come_with_its_proposal_but_unparsed_junk_is_bounded():
    listener = MultistreamListener(["/p"])
    first = bytes(range(256)) * 1024  # 256 KiB of the protocol, in the same read as the proposal
    listener.receive_data(encode_message("/multistream/1.0.0") + encode_message("/p") + first)
    assert listener.selected == "/p" and listener.unused_data == first
    # Before an agreement, a large read is parsed as messages: junk is refused, not held.
    junk = MultistreamListener(["/p"])
    with pytest.raises(ProtocolError):
        junk.receive_data(encode_message("/multistream/1.0.0") + b"\x80" * 100_000)


def test_wrong_header_is_refused():
    with pytest.raises(NegotiationError):
        MultistreamListener(["/p"]).receive_data(encode_message("/multistream/2.0.0"))


def test_oversized_message_is_refused_before_it_is_buffered():
    listener = MultistreamListener(["/p"])
    with pytest.raises(ProtocolError):
        listener.receive_data(encode_uvarint(MAX_MESSAGE_LENGTH + 1))


def test_endless_proposals_are_cut_off():
    listener = MultistreamListener(["/p"])
    listener.receive_data(encode_message("/multistream/1.0.0"))
    with pytest.raises(NegotiationError, match="without a match"):
        for i in range(MAX_PROPOSALS + 1):
            listener.receive_data(encode_message(f"/nope/{i}"))
