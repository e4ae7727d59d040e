"""The wire contract: hand-serialized chunks are ordinary protobuf, every dtype travels."""

from __future__ import annotations

import numpy as np
import pytest

from shardstream.client._wire import Piece, decode_response
from shardstream.server._wire import encode_chunk, encode_end
from shardstream.v1 import shardstream_pb2 as pb
from shardstream.v1.codec import SUPPORTED_DTYPES, FieldSpec, dtype_code, dtype_from_code


def test_codec_enum_matches_the_proto() -> None:
    for name in SUPPORTED_DTYPES:
        assert dtype_code(name) == pb.DType.Value(f"DTYPE_{name.upper()}")
        assert dtype_from_code(dtype_code(name)) == np.dtype(name)
    assert len(SUPPORTED_DTYPES) == len(pb.DType.keys()) - 1  # all but UNSPECIFIED
    with pytest.raises(ValueError, match="cannot travel on the wire"):
        dtype_code("complex64")
    with pytest.raises(ValueError, match="unknown wire dtype code 99"):
        dtype_from_code(99)


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_every_dtype_round_trips(dtype: str) -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 100, size=(5, 3, 2)).astype(dtype)
    data = encode_chunk(17, {"x": values, "id": np.arange(5, dtype=np.int64)})
    # The hand-written serializer is ordinary protobuf ...
    msg = pb.ReadResponse.FromString(data)
    assert msg.chunk.start == 17 and msg.chunk.count == 5
    t = msg.chunk.tensors[0]
    assert (t.name, t.dtype, list(t.shape)) == ("x", dtype_code(dtype), [5, 3, 2])
    assert t.data == values.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    # ... that re-serializes to the same bytes.
    assert msg.SerializeToString() == data
    piece = decode_response(data)
    assert isinstance(piece, Piece)
    assert np.array_equal(piece.arrays["x"], values)
    assert piece.arrays["x"].dtype == np.dtype(dtype)


def test_big_endian_and_non_contiguous_arrays_are_sent_little_endian_c_order() -> None:
    a = np.arange(12, dtype=">i4").reshape(3, 4)
    f = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))
    piece = decode_response(encode_chunk(0, {"a": a, "f": f[:, ::2]}))
    assert isinstance(piece, Piece)
    assert np.array_equal(piece.arrays["a"], a) and piece.arrays["a"].dtype.byteorder in "<="
    assert np.array_equal(piece.arrays["f"], f[:, ::2])


def test_end_message() -> None:
    end = decode_response(encode_end(42, draining=True))
    assert (end.records_sent, end.draining) == (42, True)  # type: ignore[union-attr]


def test_malformed_chunks_are_protocol_errors() -> None:
    from shardstream.client.errors import ProtocolError

    bad = pb.ReadResponse(
        chunk=pb.Chunk(
            start=0,
            count=2,
            tensors=[pb.Tensor(name="x", dtype=pb.DTYPE_INT32, shape=[2, 3], data=b"\0" * 20)],
        )
    ).SerializeToString()
    with pytest.raises(ProtocolError, match="20 bytes"):
        decode_response(bad)
    wrong_count = pb.ReadResponse(
        chunk=pb.Chunk(
            start=0,
            count=3,
            tensors=[pb.Tensor(name="x", dtype=pb.DTYPE_INT8, shape=[2], data=b"ab")],
        )
    ).SerializeToString()
    with pytest.raises(ProtocolError, match="shape"):
        decode_response(wrong_count)
    with pytest.raises(ProtocolError, match="neither"):
        decode_response(pb.ReadResponse().SerializeToString())


def test_field_spec_validation() -> None:
    assert FieldSpec(name="image", dtype="uint8", shape=(2, 3)).record_bytes == 6
    with pytest.raises(ValueError, match="non-negative"):
        FieldSpec(name="x", dtype="uint8", shape=(-1,))
    with pytest.raises(ValueError, match="cannot travel"):
        FieldSpec(name="x", dtype="object", shape=())


def test_chunk_parser_accepts_any_valid_encoding() -> None:
    """Unpacked shapes, fields out of order, unknown fields of every wire type."""
    from shardstream.server._wire import _int_key, _len_key, _varint

    values = np.arange(6, dtype=np.int16).reshape(3, 2)
    data = values.tobytes()
    unknown = (
        _int_key(9) + _varint(5) + _varint(9 << 3 | 1) + b"\0" * 8
        + _varint(9 << 3 | 5) + b"\0" * 4 + _len_key(9) + _varint(2) + b"zz"
    )  # fmt: skip
    tensor = (
        _len_key(4) + _varint(len(data)) + data + unknown
        + _int_key(3) + _varint(3) + _int_key(3) + _varint(2)  # unpacked shape
        + _int_key(2) + _varint(dtype_code("int16")) + _len_key(1) + _varint(1) + b"v"
    )  # fmt: skip
    chunk = _len_key(3) + _varint(len(tensor)) + tensor + _int_key(2) + _varint(3) + unknown
    chunk += _int_key(1) + _varint(40)
    message = _len_key(1) + _varint(len(chunk)) + chunk
    reference = pb.ReadResponse.FromString(message)  # it is valid protobuf
    assert reference.chunk.start == 40 and list(reference.chunk.tensors[0].shape) == [3, 2]
    piece = decode_response(message)
    assert isinstance(piece, Piece)
    assert (piece.start, piece.count) == (40, 3)
    assert np.array_equal(piece.arrays["v"], values)
    assert not piece.arrays["v"].flags.writeable  # a view of the message, not a copy


@pytest.mark.parametrize("cut", [1, 5, 17, 30])
def test_truncated_messages_are_protocol_errors(cut: int) -> None:
    from shardstream.client.errors import ProtocolError

    data = encode_chunk(0, {"x": np.arange(4, dtype=np.int32)})
    with pytest.raises(ProtocolError):
        decode_response(data[:cut])
