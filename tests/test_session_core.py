"""The sans-IO session core, without an event loop: bytes in, decisions and bytes out.

Two cores talk through :class:`Wire`, which hands each side's output to the
other in whatever pieces a test chooses; time is a :class:`Clock` the test
moves. The socket tests (test_session_*.py) check the same behaviour end to
end; these pin down each decision exactly.
"""

from __future__ import annotations

import random
import struct
from typing import TypedDict, Unpack

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamkit.errors import (
    ConnectionLost,
    FrameTooLarge,
    ProtocolError,
    ResumeRejected,
    SessionError,
    SessionExpired,
)
from streamkit.session import SessionOptions, SessionSettings
from streamkit.session.core import (
    ClientHandshake,
    ServerHandshake,
    SessionCore,
    SessionFinished,
    State,
    rejection_error,
)
from streamkit.session.protocol import (
    MAGIC,
    MAX_HANDSHAKE_MESSAGE,
    NONCE_SIZE,
    Ack,
    Close,
    CloseAck,
    Data,
    HelloNew,
    HelloResume,
    Message,
    Ping,
    Pong,
    ReceiveLimits,
    Reject,
    RejectReason,
    Welcome,
    decode_message,
    make_preface,
    resume_proof,
)

SESSION_ID = bytes(range(16))
TOKEN = bytes(range(100, 132))


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def data(offset: int, payload: bytes) -> bytes:
    return frame(bytes([0x10]) + struct.pack(">Q", offset) + payload)


def ack(received: int, consumed: int) -> bytes:
    return frame(Ack(received, consumed).encode())


def messages(wire: bytes) -> list[Message]:
    """Every message in ``wire`` (whole frames), decoded."""
    found: list[Message] = []
    while wire:
        size = struct.unpack(">I", wire[:4])[0]
        found.append(decode_message(wire[4 : 4 + size]))
        wire = wire[4 + size :]
    return found


def output(core: SessionCore) -> bytes:
    return b"".join(bytes(part) for part in core.data_to_send())


def sent(core: SessionCore) -> list[Message]:
    """The messages ``core`` has queued, decoded (and taken)."""
    return messages(output(core))


def make_core(client: bool, clock: Clock, **options: Unpack[SessionOptions]) -> SessionCore:
    return SessionCore(
        SESSION_ID,
        TOKEN,
        SessionSettings(**options),
        client=client,
        clock=clock,
    )


def attached(
    client: bool = False, peer: ReceiveLimits | None = None, **options: Unpack[SessionOptions]
) -> tuple[SessionCore, Clock]:
    """A core attached to a connection whose peer announced ``peer``; its opening bytes taken."""
    clock = Clock()
    core = make_core(client, clock, **options)
    core.attach(0, peer or ReceiveLimits(), clock.now)
    output(core)
    return core, clock


def deliver(core: SessionCore, wire: bytes) -> list[bytes]:
    return core.receive_data(wire)


# -- the handshakes -----------------------------------------------------------------


def handshake(
    client_settings: SessionSettings,
    server_settings: SessionSettings,
    clock: Clock,
    nonce: bytes = b"\x07" * NONCE_SIZE,
) -> tuple[SessionCore, SessionCore]:
    """Open a new session between two cores through both handshakes, a byte at a time."""
    ch = ClientHandshake(lambda nonce: HelloNew(client_settings.announced()))
    sh = ServerHandshake(nonce)
    for byte in b"".join(ch.data_to_send()):
        assert sh.receive_data(bytes([byte])) is None
    for byte in b"".join(sh.data_to_send()):
        assert ch.receive_data(bytes([byte])) is None
    hello: object = None
    for byte in b"".join(ch.data_to_send()):
        assert hello is None
        hello = sh.receive_data(bytes([byte]))
    assert isinstance(hello, HelloNew)
    server = SessionCore(SESSION_ID, TOKEN, server_settings, client=False, clock=clock)
    sh.accept(server.welcome())
    server.attach(0, hello.limits, clock.now)
    wire = b"".join(sh.data_to_send()) + output(server)
    welcome = None
    while welcome is None:
        welcome, wire = ch.receive_data(wire[:1]), wire[1:]
    assert isinstance(welcome, Welcome) and not welcome.present
    client = SessionCore(
        welcome.session_id, welcome.token, client_settings, client=True, clock=clock
    )
    client.attach(welcome.received, welcome.limits, clock.now)
    assert client.receive_data(ch.rest + wire) == []  # the server's opening ACK
    return client, server


def test_a_new_session_opens_through_both_handshakes_at_any_split() -> None:
    clock = Clock()
    client, server = handshake(
        SessionSettings(max_frame=1000), SessionSettings(max_unacked_frames=10), clock
    )
    assert client.state is server.state is State.ATTACHED
    assert client.session_id == SESSION_ID and client.token == TOKEN
    # Each keeps to the smaller of its own and the peer's announced limits.
    assert client.max_frame == server.max_frame == 1000
    assert client.send_window == (10, 8 * 1024 * 1024)
    assert client.send(b"hello") >= 0 and server.send(b"back") >= 0
    assert deliver(server, output(client)) == [b"hello"]
    assert deliver(client, output(server)) == [b"back"]


def test_the_client_sends_its_preface_then_its_hello_bound_to_the_nonce() -> None:
    nonce = b"\x09" * NONCE_SIZE
    core = make_core(True, Clock())
    ch = ClientHandshake(core.resume_hello, resuming=SESSION_ID)
    assert ch.data_to_send() == [make_preface()]
    assert ch.receive_data(make_preface(nonce)) is None
    [hello_frame] = ch.data_to_send()
    hello = decode_message(hello_frame[4:])
    assert isinstance(hello, HelloResume)
    assert hello.proof == resume_proof(TOKEN, nonce, SESSION_ID, 0)
    resumed = Welcome(True, SESSION_ID, 0).encode()
    assert ch.receive_data(frame(resumed) + b"rest") == Welcome(True, SESSION_ID, 0)
    assert ch.rest == b"rest"


@pytest.mark.parametrize(
    ("reason", "error"),
    [
        (RejectReason.EXPIRED, SessionExpired),
        (RejectReason.FINISHED, SessionFinished),
        (RejectReason.BAD_TOKEN, ResumeRejected),
        (RejectReason.UNKNOWN_SESSION, ResumeRejected),
        (RejectReason.BUSY, ResumeRejected),
    ],
)
def test_a_reject_ends_the_handshake_and_names_the_error_the_client_reports(
    reason: RejectReason, error: type
) -> None:
    ch = ClientHandshake(lambda nonce: HelloNew())
    ch.receive_data(make_preface(bytes(NONCE_SIZE)))
    reject = ch.receive_data(frame(Reject(reason, "because").encode()))
    assert reject == Reject(reason, "because")
    assert isinstance(rejection_error(reject), error)
    assert str(rejection_error(reject)) == "server rejected the session: because"
    core, _ = attached(client=True)
    core.rejected(reject)
    if reason == RejectReason.FINISHED:
        assert core.state is State.CLOSED and core.peer_closed and core.failure is None
    else:
        assert core.state is State.FAILED and isinstance(core.failure, error)


@pytest.mark.parametrize(
    ("reply", "resuming", "message"),
    [
        (Welcome(True, SESSION_ID, 0), None, "malformed WELCOME for a new session"),
        (Welcome(True, b"\x01" * 16, 0), SESSION_ID, "answered a resume with another session"),
        (Welcome(False, SESSION_ID, 0, TOKEN), SESSION_ID, "answered a resume with another"),
        (Ping(), None, "expected WELCOME or REJECT, got Ping"),
    ],
)
def test_a_welcome_that_does_not_answer_the_hello_is_a_protocol_error(
    reply: Welcome | Ping, resuming: bytes | None, message: str
) -> None:
    ch = ClientHandshake(lambda nonce: HelloNew(), resuming)
    ch.receive_data(make_preface(bytes(NONCE_SIZE)))
    with pytest.raises(ProtocolError, match=message):
        ch.receive_data(frame(reply.encode()))


def test_the_client_names_what_another_server_speaks() -> None:
    with pytest.raises(ProtocolError, match="version 1; this client speaks 2"):
        ClientHandshake(lambda nonce: HelloNew()).receive_data(MAGIC + b"\x01" + bytes(16))
    with pytest.raises(ProtocolError, match="looks like HTTP"):
        ClientHandshake(lambda nonce: HelloNew()).receive_data(b"HTTP/1.1 400 Bad")
    with pytest.raises(ProtocolError, match="server's first message is over the 1024 bytes"):
        ch = ClientHandshake(lambda nonce: HelloNew())
        ch.receive_data(make_preface(bytes(NONCE_SIZE)) + struct.pack(">I", 1025))
    # A server that closes early: a lost connection, or another protocol.
    ch = ClientHandshake(lambda nonce: HelloNew())
    ch.receive_data(make_preface() + b"\x16\x03")  # preface, then 2 bytes of nonce
    assert isinstance(ch.receive_eof(), ConnectionLost)
    ch = ClientHandshake(lambda nonce: HelloNew())
    ch.receive_data(b"\x16\x03\x01")
    error = ch.receive_eof()
    assert isinstance(error, ProtocolError) and "TLS" in str(error)


def server_handshake_to_hello(hello: bytes, preface: bytes | None = None) -> ServerHandshake:
    sh = ServerHandshake(b"\x01" * NONCE_SIZE)
    assert sh.receive_data(preface or make_preface()) is None
    assert sh.data_to_send() == [make_preface(b"\x01" * NONCE_SIZE)]
    return sh


def test_the_server_returns_the_hello_and_keeps_what_follows_it() -> None:
    sh = ServerHandshake(b"\x01" * NONCE_SIZE)
    wire = make_preface() + frame(HelloNew().encode()) + data(0, b"early")
    assert sh.receive_data(wire) == HelloNew()
    assert sh.rest == data(0, b"early")


def test_the_server_refuses_another_version_and_a_message_that_is_no_hello() -> None:
    sh = ServerHandshake(b"\x01" * NONCE_SIZE)
    reject = sh.receive_data(MAGIC + b"\x09")
    assert isinstance(reject, Reject) and reject.reason == RejectReason.UNSUPPORTED_VERSION
    assert "version 9; this server speaks 2" in reject.message
    preface, rejected = sh.data_to_send()
    assert preface == make_preface(b"\x01" * NONCE_SIZE)
    assert messages(rejected) == [reject]
    sh = ServerHandshake(b"\x01" * NONCE_SIZE)
    reject = sh.receive_data(make_preface() + frame(Ping().encode()))
    assert reject == Reject(RejectReason.MALFORMED, "expected a HELLO, got Ping")


def test_the_server_reads_no_hello_over_the_handshake_bound() -> None:
    sh = ServerHandshake(b"\x01" * NONCE_SIZE)
    with pytest.raises(ProtocolError, match=f"over the {MAX_HANDSHAKE_MESSAGE} bytes"):
        sh.receive_data(make_preface() + struct.pack(">I", MAX_HANDSHAKE_MESSAGE + 1))
    sh = ServerHandshake(b"\x01" * NONCE_SIZE)
    with pytest.raises(ProtocolError, match="malformed HELLO_NEW"):
        sh.receive_data(make_preface() + frame(b"\x01\x00"))


def test_the_server_answers_an_http_client_in_http_once_its_head_is_read() -> None:
    sh = ServerHandshake(b"\x01" * NONCE_SIZE)
    assert sh.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n") is None
    assert sh.http and sh.data_to_send() == []
    with pytest.raises(ProtocolError, match="looks like HTTP"):
        sh.receive_data(b"\r\n")
    [answer] = sh.data_to_send()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    # A head that never ends is answered at the end of the input.
    sh = ServerHandshake(b"\x01" * NONCE_SIZE)
    sh.receive_data(b"POST /x HTTP/1.1\r\n")
    error = sh.receive_eof()
    assert isinstance(error, ProtocolError) and "HTTP" in str(error)
    assert sh.data_to_send()[0].startswith(b"HTTP/1.1 400")


def test_the_server_tells_a_preface_cut_short_from_another_protocol() -> None:
    sh = ServerHandshake(b"\x01" * NONCE_SIZE)
    sh.receive_data(b"SK")
    assert isinstance(sh.receive_eof(), ConnectionLost)
    sh = ServerHandshake(b"\x01" * NONCE_SIZE)
    sh.receive_data(b"\x16\x03")
    error = sh.receive_eof()
    assert isinstance(error, ProtocolError) and "TLS handshake" in str(error)
    with pytest.raises(ValueError, match="a nonce is 16 bytes"):
        ServerHandshake(b"short")


# -- every resume decision ----------------------------------------------------------


def resume(core: SessionCore, nonce: bytes, received: int = 0, token: bytes = TOKEN) -> HelloResume:
    return HelloResume(SESSION_ID, resume_proof(token, nonce, SESSION_ID, received), received)


def test_a_resume_is_accepted_only_with_a_proof_for_the_nonce_given() -> None:
    core, _ = attached()
    nonce, other = b"\x01" * 16, b"\x02" * 16
    assert core.check_resume(resume(core, nonce), nonce) is None
    # The same hello on a connection with another nonce: a replayed proof.
    replayed = core.check_resume(resume(core, nonce), other)
    assert replayed == Reject(RejectReason.BAD_TOKEN, f"wrong token for session {core.id}")
    wrong = core.check_resume(resume(core, nonce, token=b"\0" * 32), nonce)
    assert wrong is not None and wrong.reason == RejectReason.BAD_TOKEN


def test_a_resume_at_an_offset_this_side_cannot_serve_is_bad_offset() -> None:
    core, _ = attached()
    for n in range(5):
        core.send(b"%d" % n)
    deliver(core, ack(5, 3))  # the peer consumed 0..2: they are released
    nonce = b"\x01" * 16
    never_sent = core.check_resume(resume(core, nonce, 6), nonce)
    assert never_sent == Reject(
        RejectReason.BAD_OFFSET, "peer expects offset 6 but only 5 frames were sent"
    )
    released = core.check_resume(resume(core, nonce, 2), nonce)
    assert released is not None and released.reason == RejectReason.BAD_OFFSET
    assert "frames below 3 were consumed and are no longer held" in released.message
    assert core.check_resume(resume(core, nonce, 3), nonce) is None


def test_a_client_welcomed_at_an_offset_it_cannot_serve_fails() -> None:
    core, clock = attached(client=True)
    core.detach(clock.now)
    with pytest.raises(ResumeRejected, match="expects offset 99 but only 0 frames"):
        core.attach(99, ReceiveLimits(), clock.now)
    assert core.state is State.FAILED
    assert isinstance(core.failure, ResumeRejected)


# -- data, the window ------------------------------------------------------------------


def test_frames_go_out_in_order_and_duplicates_are_dropped_and_counted() -> None:
    core, _ = attached()
    for payload in (b"a", b"bb", b"c" * 300_000):  # the last one not copied
        assert core.send(payload) >= 0
    parts = core.data_to_send()
    assert any(part is not None and len(part) == 300_000 for part in parts)
    wire = b"".join(bytes(p) for p in parts)
    assert messages(wire) == [Data(0, b"a"), Data(1, b"bb"), Data(2, b"c" * 300_000)]
    assert deliver(core, data(0, b"x") + data(0, b"x") + data(1, b"yy")) == [b"x", b"yy"]
    stats = core.stats()
    assert (stats.frames_received, stats.bytes_received, stats.duplicates_dropped) == (2, 3, 1)
    assert (stats.frames_sent, stats.bytes_sent) == (3, 300_003)


def test_output_joins_each_run_of_frames_once_and_hands_over_large_payloads_as_they_are() -> None:
    core, _ = attached()
    large = b"L" * 300_000
    payloads = [b"s", b"m" * 5000, b"n" * 2000, b"t", large, b"u" * 3000, b"v", b"w" * 1500]
    for payload in payloads:
        assert core.send(payload) > 0
    unsent = core.unsent
    parts = core.data_to_send()
    # The frames before the large payload in one piece, it as it is, the rest in one.
    assert [len(part) for part in parts][1:] == [300_000, len(parts[2])]
    assert parts[1] is large
    assert sum(map(len, parts)) == unsent
    wire = b"".join(bytes(part) for part in parts)
    assert messages(wire) == [Data(n, payload) for n, payload in enumerate(payloads)]
    assert core.unsent == 0
    assert core.data_to_send() == []
    # Medium frames alone: one piece.
    for payload in payloads[1:3]:
        core.send(payload)
    [joined] = core.data_to_send()
    assert messages(bytes(joined)) == [Data(8, payloads[1]), Data(9, payloads[2])]


def test_a_large_payload_read_in_one_piece_is_taken_as_read() -> None:
    core, _ = attached()
    payload = bytes(100_000)
    wire = data(0, payload)
    decoder = core.decoder
    assert core.receive_messages(decoder.feed(wire[:13])) == []
    assert decoder.missing() == len(payload)
    rest = wire[13:]
    [got] = core.receive_messages([decoder.complete(rest)])
    assert got is rest  # not copied
    assert decoder.header_missing() == 13
    assert (core.received, core.bytes_received) == (1, len(payload))


def test_the_decoder_is_the_attached_connections() -> None:
    core = make_core(False, Clock())
    with pytest.raises(RuntimeError, match="no connection is attached"):
        core.receive_data(data(0, b"x"))


def test_a_gap_is_a_protocol_error_after_the_frames_before_it() -> None:
    core, _ = attached()
    with pytest.raises(ProtocolError, match="offset 2 but offset 1 was expected"):
        core.receive_data(data(0, b"ok") + data(2, b"gap"))
    assert list(core.queue) == [b"ok"]


def test_the_send_window_bounds_frames_and_bytes_but_one_frame_always_fits() -> None:
    core, _ = attached(peer=ReceiveLimits(max_unacked_frames=3, max_unacked_bytes=100))
    assert core.send_window == (3, 100)
    assert [core.send(b"x" * 10) >= 0 for _ in range(4)] == [True, True, True, False]
    assert core.send_error(10) is None  # it waits for room
    deliver(core, ack(3, 3))
    assert core.send(bytes(1000)) >= 0  # over the byte window, alone: fits
    assert core.send(b"") == -1  # nothing more until it is consumed
    deliver(core, ack(4, 4))
    assert core.held_bytes == 0
    assert core.send(bytes(60)) >= 0
    assert core.send(bytes(41)) == -1
    assert core.send(bytes(40)) >= 0


def test_a_frame_over_either_max_frame_is_refused_naming_the_smaller() -> None:
    core, _ = attached(peer=ReceiveLimits(max_frame=100), max_frame=200)
    assert core.send(bytes(101)) == -1
    error = core.send_error(101)
    assert isinstance(error, FrameTooLarge)
    assert str(error) == "frame of 101 bytes exceeds the peer's max_frame=100"
    core, _ = attached(peer=ReceiveLimits(max_frame=300), max_frame=200)
    assert str(core.send_error(201)) == "frame of 201 bytes exceeds max_frame=200"


def test_acks_release_held_frames_and_bad_acks_are_protocol_errors() -> None:
    core, _ = attached()
    for n in range(300):
        core.send(bytes([n % 256]) * 10)
    deliver(core, ack(250, 100))
    assert (core.acknowledged, core.held_bytes) == (250, 2000)
    deliver(core, ack(260, 251))  # past the list's middle: compacted
    assert core.held_bytes == 490
    for bad, message in [
        (ack(301, 0), "ack for offset 301 but only 300 frames were sent"),
        (ack(259, 251), "ack went backwards: received 259 \\(was 260\\)"),
        (ack(270, 250), "consumed 250 \\(was 251\\)"),
        (ack(270, 280), "consumed 280 > received 270"),
    ]:
        with pytest.raises(ProtocolError, match=message):
            core.receive_data(bad)


@pytest.mark.parametrize(
    ("limits", "payloads", "over"),
    [
        ({"max_unacked_frames": 4}, [b"f"] * 5, "5 frames (5 bytes) received and not yet "),
        ({"max_unacked_bytes": 100}, [bytes(60), bytes(41)], "over max_unacked_bytes=100"),
    ],
)
def test_a_peer_past_the_receive_window_is_a_protocol_error(
    limits: SessionOptions, payloads: list[bytes], over: str
) -> None:
    core, _ = attached(**limits)
    wire = b"".join(data(n, p) for n, p in enumerate(payloads))
    with pytest.raises(ProtocolError, match="the peer sent past the receive window") as info:
        core.receive_data(wire)
    assert over in str(info.value)
    assert len(core.queue) == len(payloads)  # kept: they count as received


def test_the_receive_window_counts_what_is_held_not_duplicates_or_what_was_consumed() -> None:
    core, _ = attached(max_unacked_frames=4)
    fill = b"".join(data(n, b"x") for n in range(4))
    core.receive_data(fill)
    core.receive_data(fill)  # duplicates: not held again
    assert core.stats().duplicates_dropped == 4
    core.queue.popleft()
    core.receive_data(data(4, b"x"))  # one consumed: room for one more
    with pytest.raises(ProtocolError, match=r"5 frames \(5 bytes\)"):
        core.receive_data(data(5, b"x"))
    core, _ = attached(max_unacked_bytes=1000)
    core.receive_data(data(0, bytes(5000)))  # alone: what a sender may send
    core.queue.popleft()
    core.receive_data(data(1, bytes(5000)))
    with pytest.raises(ProtocolError, match=r"2 frames \(5001 bytes\)"):
        core.receive_data(data(2, b"x"))


# -- when acks go out ----------------------------------------------------------------------


def test_ack_every_frames_received_is_due_at_once() -> None:
    core, clock = attached(ack_every=8, ack_delay=0.01)
    core.receive_data(b"".join(data(n, b"x") for n in range(7)))
    assert core.next_deadline() == pytest.approx(clock.now + 0.01)
    core.receive_data(data(7, b"x"))
    assert core.next_deadline() == 0  # due once the input at hand is handled
    core.on_deadline(clock.now)
    assert sent(core) == [Ack(8, 0)]
    assert core.next_deadline() == pytest.approx(clock.now + 5.0)  # the keepalive


def test_a_few_frames_are_acked_ack_delay_after_the_first() -> None:
    core, clock = attached(ack_every=64, ack_delay=0.01)
    core.receive_data(data(0, b"x"))
    first = core.next_deadline()
    assert first is not None
    assert first == pytest.approx(clock.now + 0.01)
    clock.now += 0.005
    core.receive_data(data(1, b"x"))
    assert core.next_deadline() == first  # the timer runs from the first frame
    core.on_deadline(clock.now)
    assert sent(core) == []  # not yet
    clock.now = first
    core.on_deadline(clock.now)
    assert sent(core) == [Ack(2, 0)]
    core.on_deadline(clock.now + 1)
    assert sent(core) == []  # nothing new: no ack


def consume(core: SessionCore, count: int) -> None:
    """The application takes ``count`` payloads, as the glue's ``recv`` does."""
    for _ in range(count):
        core.queue.popleft()
        if len(core.queue) <= core.ack_low_water:
            core.on_consumed()


def test_consumption_is_acked_every_ack_every_frames_else_after_ack_delay() -> None:
    core, clock = attached(ack_every=4)
    core.receive_data(b"".join(data(n, bytes(10)) for n in range(4)))
    core.on_deadline(clock.now)
    assert sent(core) == [Ack(4, 0)]
    consume(core, 1)  # the first frame consumed starts the timer
    assert core.next_deadline() == pytest.approx(clock.now + 0.01)
    consume(core, 2)
    assert core.next_deadline() == pytest.approx(clock.now + 0.01)
    consume(core, 1)
    assert core.next_deadline() == 0
    core.on_deadline(clock.now)
    assert sent(core) == [Ack(4, 4)]


def test_a_quarter_of_the_byte_window_received_or_consumed_is_acked_at_once() -> None:
    core, clock = attached(ack_every=64, max_unacked_bytes=4000)
    core.receive_data(data(0, bytes(999)))
    assert core.next_deadline() == pytest.approx(clock.now + 0.01)
    core.receive_data(data(1, b"x"))  # 1000 bytes: a quarter of the window
    assert core.next_deadline() == 0
    core.on_deadline(clock.now)
    assert sent(core) == [Ack(2, 0)]
    consume(core, 1)
    assert core.next_deadline() == pytest.approx(clock.now + 0.01)
    consume(core, 1)  # the batch boundary: 1000 bytes consumed
    assert core.next_deadline() == 0
    core.on_deadline(clock.now)
    assert sent(core) == [Ack(2, 2)]


def test_a_large_frame_window_is_refilled_without_waiting_for_ack_delay() -> None:
    """1 MiB frames in an 8 MiB window: each 2 MiB consumed is acked at once."""
    core, clock = attached()
    mib = bytes(1024 * 1024)
    for n in range(8):
        core.receive_data(data(n, mib))
    core.on_deadline(clock.now)
    acks = [m for m in sent(core) if isinstance(m, Ack)]
    assert acks and acks[-1].received == 8
    consume(core, 1)
    assert core.next_deadline() == pytest.approx(clock.now + 0.01)
    consume(core, 1)
    assert core.next_deadline() == 0
    core.on_deadline(clock.now)
    assert sent(core) == [Ack(8, 2)]


def test_an_ack_window_of_few_frames_is_acked_every_quarter() -> None:
    core, _ = attached(peer=ReceiveLimits(max_unacked_frames=8), ack_every=64)
    core.receive_data(data(0, b"a") + data(1, b"b"))
    assert core.next_deadline() == 0


# -- keepalive -------------------------------------------------------------------------------


def test_pings_every_interval_and_a_silent_connection_is_detached() -> None:
    core, clock = attached(keepalive_interval=1.0, keepalive_timeout=2.5)
    start = clock.now
    assert core.next_deadline() == start + 1.0
    core.on_deadline(start + 1.0)
    assert sent(core) == [Ping()]
    core.receive_data(frame(Pong().encode()))  # heard: alive
    core.on_deadline(start + 2.0)
    assert sent(core) == [Ping()]
    core.on_deadline(start + 3.0)
    assert core.attached and sent(core) == [Ping()]
    core.on_deadline(start + 4.0)
    assert sent(core) == [Ping()]
    core.on_deadline(start + 5.0)  # silent since 2.0 (heard at the tick of 2.0)
    assert not core.attached and core.state is State.DETACHED
    assert "keepalive timeout" in str(core.detach_reason)


def test_a_ping_is_answered_and_a_client_pings_right_after_each_attach() -> None:
    core, _ = attached()
    core.receive_data(frame(Ping().encode()))
    assert sent(core) == [Pong()]
    clock = Clock()
    client = make_core(True, clock)
    client.attach(0, ReceiveLimits(), clock.now)
    assert sent(client) == [Ack(0, 0), Ping()]


# -- detaching and resuming -----------------------------------------------------------------


def test_a_resume_replays_what_the_peer_lacks_then_acks_and_counts_replays() -> None:
    core, clock = attached()
    for n in range(5):
        core.send(b"%d" % n)
    output(core)  # written to the connection...
    core.detach(clock.now)  # ...which is lost
    core.send(b"5")  # sent while detached: not a replay
    core.attach(3, ReceiveLimits(), clock.now)
    assert sent(core) == [Data(3, b"3"), Data(4, b"4"), Data(5, b"5"), Ack(0, 0)]
    assert core.stats().frames_replayed == 2
    assert core.stats().connections == 2


def test_a_server_waits_resume_timeout_then_expires() -> None:
    core, clock = attached(resume_timeout=30)
    core.detach(clock.now, ConnectionLost("cut"))
    assert core.state is State.DETACHED
    assert core.next_deadline() == clock.now + 30
    core.on_deadline(clock.now + 29)
    assert core.state is State.DETACHED
    core.on_deadline(clock.now + 30)
    # mypy keeps the narrowing of core.state across the calls:
    assert core.state is State.FAILED  # type: ignore[comparison-overlap]
    assert isinstance(core.failure, SessionExpired)
    assert "resume_timeout=30 s" in str(core.failure)
    assert core.send_error(1) is core.failure


def test_a_client_without_progress_backs_off_and_gives_up() -> None:
    core, clock = attached(client=True, max_reconnect_time=10)
    core.send(b"x")
    deliver(core, ack(1, 1))  # progress on the first connection
    core.detach(clock.now)
    assert core.reconnect_at_once
    start = clock.now
    core.attach(1, ReceiveLimits(), clock.now)
    clock.now += 3
    core.detach(clock.now, ConnectionLost("dropped"))  # resumed, lost: no progress
    assert not core.reconnect_at_once and core.dropped == 1
    assert core.next_deadline() == start + 10  # the run's deadline, not a fresh one
    core.resume_failed(OSError("refused"))
    core.on_deadline(start + 10)
    assert core.state is State.FAILED
    assert isinstance(core.failure, ConnectionLost)
    assert "within max_reconnect_time=10 s: OSError('refused')" in str(core.failure)


def test_a_client_whose_resumes_are_all_dropped_fails_with_a_protocol_error() -> None:
    core, clock = attached(client=True, max_reconnect_time=1)
    core.detach(clock.now)
    for _ in range(3):
        core.attach(0, ReceiveLimits(), clock.now)
        core.detach(clock.now, ConnectionLost("dropped at once"))
    core.on_deadline(clock.now + 1)
    assert isinstance(core.failure, ProtocolError)
    # The first connection made no progress either.
    assert "4 connections in a row were resumed and lost" in str(core.failure)


def test_a_pong_after_a_resume_is_progress() -> None:
    core, clock = attached(client=True)
    core.detach(clock.now)
    core.attach(0, ReceiveLimits(), clock.now)
    core.receive_data(frame(Pong().encode()))
    core.detach(clock.now)
    assert core.reconnect_at_once


# -- closing -------------------------------------------------------------------------------


def test_close_waits_for_every_frame_to_be_received_then_sends_close() -> None:
    core, _ = attached()
    core.send(b"a")
    output(core)
    core.close()
    assert core.state is State.CLOSING
    assert core.send(b"b") == -1
    assert str(core.send_error(1)) == "cannot send: the session is closing"
    assert sent(core) == []  # frame 0 not yet received by the peer
    core.receive_data(data(0, b"in") + ack(1, 0))
    assert sent(core) == [Ack(1, 0), Close(1)]
    core.receive_data(frame(CloseAck().encode()))
    # mypy keeps the narrowing of core.state across the calls:
    assert core.state is State.CLOSED  # type: ignore[comparison-overlap]
    assert list(core.queue) == [b"in"]  # still read by the application


def test_a_peer_close_is_acknowledged_and_ends_the_session() -> None:
    core, _ = attached()
    core.receive_data(data(0, b"last"))
    with pytest.raises(ProtocolError, match="CLOSE at offset 2 but 1 frames were received"):
        core.receive_data(frame(Close(2).encode()))
    core, _ = attached()
    core.receive_data(data(0, b"last") + frame(Close(1).encode()))
    assert sent(core)[-1] == CloseAck()
    assert core.state is State.CLOSED and core.peer_closed
    assert str(core.send_error(1)) == "cannot send: the peer closed the session"


def test_a_close_ack_for_no_close_is_a_protocol_error() -> None:
    core, _ = attached()
    with pytest.raises(ProtocolError, match="CLOSE_ACK for a close that was never sent"):
        core.receive_data(frame(CloseAck().encode()))


def test_both_sides_closing_at_once_each_answer_the_other() -> None:
    clock = Clock()
    client, server = handshake(SessionSettings(), SessionSettings(), clock)
    output(client)
    output(server)
    client.close()
    server.close()
    to_server, to_client = output(client), output(server)
    server.receive_data(to_server)
    client.receive_data(to_client)
    assert client.state is server.state is State.CLOSED


def test_a_server_that_sent_close_with_everything_acknowledged_closes_when_detached() -> None:
    core, clock = attached()
    core.close()
    assert sent(core)[-1] == Close(0)
    core.detach(clock.now)  # the CLOSE_ACK was lost with the connection
    assert core.state is State.CLOSED


def test_a_client_closing_resends_close_after_a_resume() -> None:
    core, clock = attached(client=True)
    core.close()
    output(core)
    core.detach(clock.now)
    assert core.state is State.CLOSING
    core.attach(0, ReceiveLimits(), clock.now)
    assert sent(core) == [Ack(0, 0), Close(0), Ping()]
    core.rejected(Reject(RejectReason.FINISHED, "closed"))  # the server had finished
    # mypy keeps the narrowing of core.state across the calls:
    assert core.state is State.CLOSED and core.peer_closed  # type: ignore[comparison-overlap]


def test_abort_fails_the_session_and_frees_its_buffers() -> None:
    core, _ = attached()
    core.send(b"held")
    core.receive_data(data(0, b"queued"))
    core.abort()
    assert core.state is State.FAILED and not core.queue and core.held_bytes == 0
    error = core.send_error(1)
    assert isinstance(error, SessionError) and "aborted" in str(error)
    assert core.send(b"x") == -1


# -- exactly once, in order, under any chunking and cuts ------------------------------------


class _Window(TypedDict, total=False):
    """The receive window of both cores of a Link."""

    max_unacked_frames: int
    max_unacked_bytes: int


class Link:
    """A client and a server core, the bytes between them delivered in random pieces."""

    def __init__(self, rng: random.Random, window: _Window) -> None:
        self.rng = rng
        self.clock = Clock()
        options = SessionSettings(ack_every=4, **window)
        self.client, self.server = handshake(options, options, self.clock)
        self.pending = {"up": b"", "down": b""}

    def pump(self, direction: str) -> None:
        """Deliver a random prefix of what is in flight one way."""
        sender, receiver = (
            (self.client, self.server) if direction == "up" else (self.server, self.client)
        )
        self.pending[direction] += output(sender)
        wire = self.pending[direction]
        if not wire or not receiver.attached:
            return
        cut = self.rng.randint(1, len(wire))
        self.pending[direction] = wire[cut:]
        receiver.receive_data(wire[:cut])

    def tick(self) -> None:
        self.clock.now += 0.005
        for core in (self.client, self.server):
            deadline = core.next_deadline()
            if deadline is not None and deadline <= self.clock.now:
                core.on_deadline(self.clock.now)

    def cut(self) -> None:
        """The connection dies with whatever is in flight; the client resumes."""
        self.pending = {"up": b"", "down": b""}
        now = self.clock.now
        self.client.detach(now)
        self.server.detach(now)
        nonce = bytes(self.rng.randbytes(NONCE_SIZE))
        hello = self.client.resume_hello(nonce)
        assert self.server.check_resume(hello, nonce) is None
        welcome = self.server.welcome()
        self.server.attach(hello.received, hello.limits, now)
        self.client.attach(welcome.received, welcome.limits, now)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    to_server=st.lists(st.binary(max_size=40), max_size=60),
    to_client=st.lists(st.binary(max_size=40), max_size=60),
    seed=st.integers(0, 2**32 - 1),
)
def test_exactly_once_in_order_under_random_chunking_and_cuts(
    to_server: list[bytes], to_client: list[bytes], seed: int
) -> None:
    rng = random.Random(seed)
    link = Link(rng, {"max_unacked_frames": 8, "max_unacked_bytes": 100})
    queues = {"up": list(to_server), "down": list(to_client)}
    got: dict[str, list[bytes]] = {"up": [], "down": []}
    cores = {"up": (link.client, link.server), "down": (link.server, link.client)}
    for _ in range(5000):
        if (
            not any(queues.values())
            and len(got["up"]) == len(to_server)
            and len(got["down"]) == len(to_client)
        ):
            break
        step = rng.random()
        direction = rng.choice(("up", "down"))
        sender, receiver = cores[direction]
        if step < 0.3 and queues[direction]:
            if sender.send(queues[direction][0]) >= 0:
                queues[direction].pop(0)
        elif step < 0.7:
            link.pump(direction)
        elif step < 0.9:
            while receiver.queue and rng.random() < 0.7:
                got[direction].append(receiver.queue.popleft())
                if len(receiver.queue) <= receiver.ack_low_water:
                    receiver.on_consumed()
        elif step < 0.97:
            link.tick()
        else:
            link.cut()
    assert got["up"] == to_server
    assert got["down"] == to_client
    assert link.client.state is link.server.state is State.ATTACHED


def test_a_server_closing_without_a_connection_and_nothing_unacknowledged_is_closed() -> None:
    core, clock = attached()
    core.send(b"a")
    core.receive_data(ack(1, 1))
    core.detach(clock.now)
    core.close()  # its CLOSE would go on the next connection: the client has everything
    assert core.state is State.CLOSED and core.close_sent


def test_a_client_closing_without_a_connection_sends_close_on_the_next() -> None:
    core, clock = attached(client=True)
    core.detach(clock.now)
    core.close()
    assert core.state is State.CLOSING and core.close_sent
    core.attach(0, ReceiveLimits(), clock.now)
    assert sent(core) == [Ack(0, 0), Close(0), Ping()]
