"""Read an offline W&B run file (``run-*.wandb``) the way ``wandb sync`` does.

The file is a LevelDB-style log: a 7-byte file header (``:W&B``, magic, version), then
32 KiB blocks of chunks, each chunk a 7-byte header (CRC, length, type) and a payload.
A record longer than what is left of a block is split into FIRST/MIDDLE/LAST chunks, so
searching the raw bytes can miss a value cut by a block boundary; these helpers join the
chunks back into whole ``Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def record_payloads(path: Path) -> list[bytes]:
    """The serialized records of a run file, each joined from its chunks."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    payloads: list[bytes] = []
    pending = b""
    pos = HEADER
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # the block's tail is zero padding
            pos += left_in_block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if kind == 0 and length == 0:  # padding written before a block boundary
            pos += left_in_block
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            payloads.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            payloads.append(pending + chunk)
            pending = b""
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")
    return payloads


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Every record of a run file, parsed."""
    parsed = []
    for payload in record_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        parsed.append(record)
    return parsed


def history_values(path: Path, key: str) -> list[float]:
    """Every value logged to the run's history under ``key``, in order."""
    values = []
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        for item in record.history.item:
            name = item.key or "/".join(item.nested_key)
            if name == key:
                values.append(float(json.loads(item.value_json)))
    return values
