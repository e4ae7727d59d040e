"""The shardstream v1 wire contract.

`shardstream.proto` is the contract; `shardstream_pb2*` is generated from it
(run `python protos/regenerate.py`). `codec` holds the one hand-written piece
both sides share: numpy dtypes and field specs <-> the wire's enum values;
`ragged` the values + offsets form of ragged (variable-length, text) fields.
"""
