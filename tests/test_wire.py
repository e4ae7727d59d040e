"""The wire contract: hand-serialized chunks are ordinary protobuf, every dtype travels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardstream.client._wire import Piece, decode_response
from shardstream.server._npz import NpzDecoder as NpzDecoderBase
from shardstream.server._wire import encode_chunk, encode_end
from shardstream.v1 import shardstream_pb2 as pb
from shardstream.v1.codec import (
    SUPPORTED_DTYPES,
    TEXT_DTYPES,
    FieldSpec,
    dtype_code,
    dtype_from_code,
    dtype_name,
)
from shardstream.v1.ragged import Ragged


def test_codec_enum_matches_the_proto() -> None:
    for name in SUPPORTED_DTYPES:
        assert dtype_code(name) == pb.DType.Value(f"DTYPE_{name.upper()}")
        assert dtype_from_code(dtype_code(name)) == np.dtype(name)
    for name in TEXT_DTYPES:  # one string per record, uint8 values on the wire
        assert dtype_code(name) == pb.DType.Value(f"DTYPE_{name.upper()}")
        assert dtype_from_code(dtype_code(name)) == np.dtype("uint8")
        assert dtype_name(dtype_code(name)) == name
    # all but UNSPECIFIED
    assert len(SUPPORTED_DTYPES) + len(TEXT_DTYPES) == len(pb.DType.keys()) - 1
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
    # ... that re-serializes to the same message (protobuf writes the padding after the
    # data, in field order; the worker writes it before, to align the data).
    assert pb.ReadResponse.FromString(msg.SerializeToString()) == msg
    assert all(len(t.pad) < 64 and not any(t.pad) for t in msg.chunk.tensors)
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
        FieldSpec(name="x", dtype="uint8", shape=(2, -1))  # only the first may be ragged
    with pytest.raises(ValueError, match="non-negative"):
        FieldSpec(name="x", dtype="uint8", shape=(-2,))
    assert FieldSpec(name="x", dtype="uint8", shape=(-1, 3)).ragged
    with pytest.raises(ValueError, match="shape must be"):
        FieldSpec(name="x", dtype="string", shape=(3,))
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


def test_layout_then_fill_gives_the_bytes_of_encode_chunk() -> None:
    """The in-place serializer (headers first, tensors filled afterwards in the buffer)
    produces exactly the message `encode_chunk` builds from the same arrays."""
    from shardstream.server._wire import layout_chunk_into

    rng = np.random.default_rng(3)
    arrays = {
        "id": np.arange(40, 47, dtype=np.int64),
        "image": rng.random((7, 5, 3), dtype=np.float32),
        "mask": rng.random((7, 2)) > 0.5,
        "label": rng.integers(0, 9, size=7).astype(np.uint16),
    }
    schema = tuple(FieldSpec(k, v.dtype.name, v.shape[1:]) for k, v in arrays.items())
    buf = memoryview(bytearray(1 << 16))
    size, views = layout_chunk_into(buf, 40, 7, schema)
    for name, view in views.items():
        assert view.flags.writeable and view.shape == arrays[name].shape
        view[...] = arrays[name]
    assert bytes(buf[:size]) == encode_chunk(40, arrays)
    with pytest.raises(ValueError, match="does not fit"):
        layout_chunk_into(memoryview(bytearray(size - 1)), 40, 7, schema)


def test_chunks_decoded_into_a_buffer_equal_the_plain_path(tmp_path: Path) -> None:
    """`read_chunk_into` (npz straight from the file; other formats via `read` and a
    copy; big-endian and compressed members; a subclass that transforms in `read`)
    gives the same bytes as `read_chunk`."""
    from shardstream.server import make_dataset
    from shardstream.server._decoders import decoder_ref
    from shardstream.server._decoding import read_chunk, read_chunk_into
    from shardstream.server._files import shard_stat
    from shardstream.server._shm import ChunkBuffers, attach

    make_dataset(tmp_path / "npz", shards=1, records=50, shape=(4, 4, 3))
    make_dataset(tmp_path / "csv", shards=1, records=50, shape=(3,), format="csv")
    odd = tmp_path / "odd" / "shard.npz"
    odd.parent.mkdir()
    np.savez_compressed(
        odd,
        id=np.arange(50, dtype=np.int64),
        big=np.arange(100, dtype=">f8").reshape(50, 2),
    )
    cases = [
        (decoder_ref("npz"), tmp_path / "npz" / "shard-00000.npz"),
        (decoder_ref("npz"), odd),
        (decoder_ref("csv"), tmp_path / "csv" / "part-000"),
        (f"{__name__}:Doubled", tmp_path / "npz" / "shard-00000.npz"),
    ]
    buffers = ChunkBuffers(2, 1 << 20)
    try:
        attach(buffers.handle())  # as a decoding process does
        for ref, path in cases:
            schema = _load(ref).index(path).schema
            stamp = shard_stat(path)
            for start, count in [(0, 50), (7, 13), (49, 1)]:
                expected = read_chunk(ref, path, stamp, start, count, schema)
                size = read_chunk_into(1, ref, path, stamp, start, count, schema)
                assert buffers.take(1, size) == expected, (ref, path.name, start, count)
    finally:
        buffers.close()


def _load(ref: str) -> Any:
    from shardstream.server._decoders import load_decoder

    return load_decoder(ref)


class Doubled(NpzDecoderBase):
    """A plug-in that transforms in `read`: its transform must not be bypassed."""

    name = "doubled-test"

    def read(self, path: Any, start: int, count: int) -> dict[str, np.ndarray[Any, Any]]:
        out = dict(super().read(path, start, count))
        out["image"] = out["image"] * 2
        return out


def _data_offsets(data: bytes) -> list[tuple[str, int, int]]:
    """(tensor name, field, offset) of every tensor's data and lengths in a chunk message,
    found by walking the wire format as any reader would."""
    from shardstream.client._chunkparse import _fields

    buf = memoryview(data)
    (chunk,) = [v for f, w, v in _fields(buf, 0, len(buf)) if f == 1]
    out = []
    for f, _w, span in _fields(buf, *chunk):
        if f != 3:
            continue
        fields = list(_fields(buf, *span))
        name = next(bytes(buf[v[0] : v[1]]).decode() for f2, _, v in fields if f2 == 1)
        out += [(name, f2, v[0]) for f2, w2, v in fields if f2 in (4, 5) and w2 == 2]
    return out


_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(
    start=st.integers(0, 2**40),
    count=st.integers(1, 40),
    shard=st.text(alphabet="abc/._-0123456789", max_size=300),
    fields=st.dictionaries(
        _names,
        st.tuples(
            st.sampled_from(SUPPORTED_DTYPES),
            st.lists(st.integers(1, 7), max_size=3),
            st.booleans(),  # ragged
        ),
        min_size=1,
        max_size=5,
    ),
)
def test_tensor_data_and_lengths_start_at_64_byte_offsets(
    start: int, count: int, shard: str, fields: dict[str, tuple[str, list[int], bool]]
) -> None:
    """Every tensor's data and a ragged field's lengths start at a multiple of 64 bytes of
    the message, whatever the names, shapes, start and shard id before them; the message
    is still what a generic protobuf parser reads, and the in-place layout gives the same
    bytes."""
    rng = np.random.default_rng(count)
    arrays: dict[str, Any] = {}
    for name, (dtype, inner, ragged) in fields.items():
        if ragged:
            lengths = rng.integers(0, 4, size=count)
            values = rng.integers(0, 100, size=(int(lengths.sum()), *inner)).astype(dtype)
            arrays[name] = Ragged.from_lengths(values, lengths)
        else:
            arrays[name] = rng.integers(0, 100, size=(count, *inner)).astype(dtype)
    data = encode_chunk(start, arrays, shard)
    offsets = _data_offsets(data)
    assert len(offsets) == len(arrays) + sum(isinstance(a, Ragged) for a in arrays.values())
    assert [o for o in offsets if o[2] % 64] == []
    msg = pb.ReadResponse.FromString(data)
    assert (msg.chunk.start, msg.chunk.count, msg.chunk.shard) == (start, count, shard)
    for t in msg.chunk.tensors:
        a = arrays[t.name]
        values = a.values if isinstance(a, Ragged) else a
        assert t.data == values.astype(values.dtype.newbyteorder("<")).tobytes()
    if not any(isinstance(a, Ragged) for a in arrays.values()):
        from shardstream.server._wire import layout_chunk_into

        schema = tuple(FieldSpec(k, v.dtype.name, v.shape[1:]) for k, v in arrays.items())
        buf = memoryview(bytearray(len(data) + 64))
        size, views = layout_chunk_into(buf, start, count, schema, shard)
        for name, view in views.items():
            view[...] = arrays[name]
        assert bytes(buf[:size]) == data


@pytest.mark.parametrize("delta", range(-70, 70, 3))
def test_alignment_settles_where_the_padding_changes_a_length_varint(delta: int) -> None:
    """Messages whose size is near 2**21 (a length varint grows from 3 to 4 bytes there):
    the padding that aligns the data can push a length over the boundary, and the layout
    must still come out aligned."""
    n = 2**21 - 64 + delta
    data = encode_chunk(3, {"x": np.zeros(n, dtype=np.uint8), "y": np.ones(n, np.uint8)}, "s")
    assert [o for o in _data_offsets(data) if o[2] % 64] == []
    msg = pb.ReadResponse.FromString(data)
    assert [len(t.data) for t in msg.chunk.tensors] == [n, n]


_VALID = encode_chunk(
    7, {"x": np.arange(24, dtype=np.float32).reshape(4, 2, 3), "id": np.arange(4)}, "s.npz"
)


@settings(max_examples=400, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, len(_VALID)),
)
def test_a_mangled_chunk_is_a_protocol_error_or_a_consistent_piece(
    edits: list[tuple[int, int]], cut: int
) -> None:
    """Bytes changed or cut anywhere: the parser gives a ProtocolError, or a piece whose
    arrays have `count` records and lie inside the message; never another exception."""
    from shardstream.client.errors import ProtocolError

    data = bytearray(_VALID)
    for at, value in edits:
        data[at] = value
    message = bytes(data[:cut])
    try:
        piece = decode_response(message)
    except ProtocolError:
        return
    if isinstance(piece, Piece):
        for array in piece.arrays.values():
            values = array.values if isinstance(array, Ragged) else array
            assert values.base is not None and values.nbytes <= len(message)
            assert len(array) == piece.count
