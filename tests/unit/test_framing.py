"""TCP framing (docs/protocol.md §1): bytes in, payloads out, whatever way TCP split them."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imserver.protocol.framing import HEADER_SIZE, FrameDecoder, FrameTooLarge, encode_frame
from imserver.utils.errors import IMError, TooLarge

MAX_FRAME = 64

payloads = st.lists(st.binary(max_size=MAX_FRAME), max_size=8)


def header(length: int) -> bytes:
    """A bare 4-byte big-endian length prefix."""
    return struct.pack(">I", length)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the given offsets (any order, duplicates give empty chunks)."""
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[bytes]:
    frames: list[bytes] = []
    for chunk in chunks:
        frames.extend(decoder.feed(chunk))
    return frames


@st.composite
def stream_and_chunks(draw: st.DrawFn) -> tuple[list[bytes], list[bytes]]:
    """Some payloads, and their encoded stream cut into arbitrary chunks."""
    frames = draw(payloads)
    stream = b"".join(encode_frame(p) for p in frames)
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=12))
    return frames, chunked(stream, cuts)


# --- encode_frame ------------------------------------------------------------------


def test_encode_frame_prefixes_big_endian_length() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"
    assert encode_frame(b"x" * 0x0102) == b"\x00\x00\x01\x02" + b"x" * 0x0102
    assert HEADER_SIZE == 4


@given(st.binary(max_size=4 * MAX_FRAME))
@settings(max_examples=100)
def test_encode_frame_round_trips(payload: bytes) -> None:
    decoder = FrameDecoder(max_frame=len(payload))
    assert decoder.feed(encode_frame(payload)) == [payload]
    assert decoder.buffered == 0


# --- splitting ---------------------------------------------------------------------


def test_several_frames_in_one_feed() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    stream = encode_frame(b"one") + encode_frame(b"two") + encode_frame(b"three")
    assert decoder.feed(stream) == [b"one", b"two", b"three"]
    assert decoder.buffered == 0


def test_every_single_split_point_gives_the_same_frames() -> None:
    frames = [b"hello", b"", b"x" * MAX_FRAME, b"{", b"\x00\x00\x00\x00"]
    stream = b"".join(encode_frame(p) for p in frames)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder(MAX_FRAME)
        assert feed_all(decoder, [stream[:cut], stream[cut:]]) == frames, cut
        assert decoder.buffered == 0


def test_byte_by_byte() -> None:
    frames = [b"abc", b"", b"defg"]
    stream = b"".join(encode_frame(p) for p in frames)
    decoder = FrameDecoder(MAX_FRAME)
    out = feed_all(decoder, [stream[i : i + 1] for i in range(len(stream))])
    assert out == frames


def test_frame_is_returned_only_when_complete() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    frame = encode_frame(b"payload")
    assert decoder.feed(frame[:-1]) == []
    assert decoder.feed(frame[-1:]) == [b"payload"]


def test_empty_feed_is_harmless() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    assert decoder.feed(b"") == []
    assert decoder.feed(encode_frame(b"a")[:2]) == []
    assert decoder.feed(b"") == []
    assert decoder.buffered == 2


@given(stream_and_chunks())
@settings(max_examples=200)
def test_any_chunking_gives_the_same_frames(case: tuple[list[bytes], list[bytes]]) -> None:
    frames, chunks = case
    decoder = FrameDecoder(MAX_FRAME)
    assert feed_all(decoder, chunks) == frames
    assert decoder.buffered == 0


# --- empty payloads ----------------------------------------------------------------


def test_empty_payload() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    assert decoder.feed(encode_frame(b"")) == [b""]
    assert decoder.buffered == 0


def test_consecutive_empty_payloads() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    assert decoder.feed(header(0) * 3) == [b"", b"", b""]


def test_empty_payload_completes_as_soon_as_its_header_does() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    assert decoder.feed(b"\x00\x00\x00") == []
    assert decoder.feed(b"\x00") == [b""]


# --- max_frame ---------------------------------------------------------------------


def test_exactly_max_frame_is_accepted() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    assert decoder.feed(encode_frame(b"m" * MAX_FRAME)) == [b"m" * MAX_FRAME]


def test_max_frame_plus_one_is_refused_from_the_header_alone() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(header(MAX_FRAME + 1))  # no payload byte sent
    err = info.value
    assert err.code == "too_large"
    assert err.status == 413
    assert isinstance(err, TooLarge)
    assert isinstance(err, IMError)
    assert str(MAX_FRAME + 1) in err.message
    assert err.frames == []
    assert decoder.buffered == 0


def test_header_split_across_feeds_is_refused_when_complete() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    big = header(MAX_FRAME + 1)
    assert decoder.feed(big[:3]) == []
    with pytest.raises(FrameTooLarge):
        decoder.feed(big[3:])


def test_largest_declared_length_is_refused_without_waiting() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"\xff\xff\xff\xff")


def test_oversized_frame_after_valid_ones_keeps_them_on_the_error() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(encode_frame(b"a") + encode_frame(b"") + header(MAX_FRAME + 1) + b"junk")
    assert info.value.frames == [b"a", b""]


@given(payloads, st.data())
@settings(max_examples=100)
def test_frames_before_an_oversized_header_never_depend_on_chunking(
    good: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(encode_frame(p) for p in good) + header(MAX_FRAME + 1) + b"x" * 10
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    decoder = FrameDecoder(MAX_FRAME)
    got: list[bytes] = []
    with pytest.raises(FrameTooLarge) as info:
        for chunk in chunked(stream, cuts):
            got.extend(decoder.feed(chunk))
    assert got + info.value.frames == good


# --- buffered ----------------------------------------------------------------------


def test_buffered_counts_bytes_of_the_frame_in_progress() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    assert decoder.buffered == 0
    frame = encode_frame(b"abcdef")
    assert decoder.feed(frame[:2]) == []
    assert decoder.buffered == 2
    assert decoder.feed(frame[2:7]) == []  # header complete, 3 payload bytes
    assert decoder.buffered == 7
    assert decoder.feed(frame[7:]) == [b"abcdef"]
    assert decoder.buffered == 0


def test_buffered_excludes_frames_already_returned() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    assert decoder.feed(encode_frame(b"done") + encode_frame(b"partial")[:5]) == [b"done"]
    assert decoder.buffered == 5


@given(stream_and_chunks())
@settings(max_examples=100)
def test_buffered_is_bytes_fed_minus_bytes_returned(
    case: tuple[list[bytes], list[bytes]],
) -> None:
    _, chunks = case
    decoder = FrameDecoder(MAX_FRAME)
    fed = returned = 0
    for chunk in chunks:
        fed += len(chunk)
        returned += sum(HEADER_SIZE + len(p) for p in decoder.feed(chunk))
        assert decoder.buffered == fed - returned


# --- fuzz --------------------------------------------------------------------------


@given(st.lists(st.binary(max_size=32), max_size=10))
@settings(max_examples=300)
def test_arbitrary_bytes_raise_nothing_but_frame_too_large(chunks: list[bytes]) -> None:
    decoder = FrameDecoder(max_frame=16)
    try:
        for chunk in chunks:
            for frame in decoder.feed(chunk):
                assert len(frame) <= 16
    except FrameTooLarge as exc:
        assert all(len(frame) <= 16 for frame in exc.frames)
