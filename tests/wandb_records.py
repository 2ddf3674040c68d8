"""Read an offline W&B run file (``run-<id>.wandb``) back into protobuf records, for tests.

wandb 0.31 writes a 7-byte header, then LevelDB-log framing in 32 KiB blocks: each chunk is a 4-byte
checksum, a 2-byte little-endian length, a 1-byte type (1 full, 2 first, 3 middle, 4 last) and the
payload; a block's tail shorter than a chunk header is zero padding. Payloads are
``wandb.proto.wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
CHUNK_HEADER = 7


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    records, pending = [], b""
    offset = HEADER
    while offset + CHUNK_HEADER <= len(data):
        block_left = BLOCK - (offset % BLOCK)
        if block_left < CHUNK_HEADER:
            offset += block_left
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + CHUNK_HEADER])
        if length == 0 and kind == 0:
            offset += block_left  # zero padding up to the next block
            continue
        payload = data[offset + CHUNK_HEADER : offset + CHUNK_HEADER + length]
        offset += CHUNK_HEADER + length
        if kind == 1:
            pending = payload
        elif kind == 2:
            pending = payload
            continue
        elif kind == 3:
            pending += payload
            continue
        else:
            pending += payload
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
    return records
