"""Read and write an offline W&B run file (`run-*.wandb`) with wandb's own protobuf records.

The format (wandb 0.31 writes it from Go; no Python module reads it any more): a 7-byte header
(":W&B", a magic number, a version), then 32 KiB blocks of chunks, each `<IHB` (crc32 of the type
byte and the data, length, type: 1 full, 2 first, 3 middle, 4 last) and its data; a block whose tail
is too short for a chunk header is zero-padded. A job killed mid-write leaves a torn last record:
reading stops before it.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

BLOCK = 32 * 1024
HEADER_BYTES = 7
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_payloads(path: Path) -> tuple[bytes, list[bytes]]:
    """The file header and each complete record's bytes, in order."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"'{path}': not a W&B run file")
    pos, pending, records = HEADER_BYTES, b"", []
    while pos + CHUNK.size <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < CHUNK.size:
            pos += left_in_block
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:              # zero padding to the end of the block
            pos += left_in_block
            continue
        chunk = data[pos + CHUNK.size: pos + CHUNK.size + length]
        if len(chunk) != length or zlib.crc32(bytes([kind]) + chunk) != crc:
            break                                  # torn by a kill
        pos += CHUNK.size + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            records.append(pending)
            pending = b""
    return data[:HEADER_BYTES], records


def write_payloads(path: Path, header: bytes, records: list[bytes]) -> None:
    """The inverse of read_payloads, written atomically."""
    from dcgan_dist.fsutil import atomic_write_bytes

    out = bytearray(header)
    for payload in records:
        first = True
        while True:
            left_in_block = BLOCK - (len(out) % BLOCK)
            if left_in_block < CHUNK.size:
                out += b"\0" * left_in_block
                continue
            room = left_in_block - CHUNK.size
            chunk, payload = payload[:room], payload[room:]
            kind = (FULL if not payload else FIRST) if first else (LAST if not payload else MIDDLE)
            out += CHUNK.pack(zlib.crc32(bytes([kind]) + chunk), len(chunk), kind) + chunk
            first = False
            if not payload:
                break
    atomic_write_bytes(Path(path), bytes(out))


def parse(payload: bytes):
    from wandb.proto import wandb_internal_pb2

    rec = wandb_internal_pb2.Record()
    rec.ParseFromString(payload)
    return rec


def read_records(path: Path) -> list:
    return [parse(p) for p in read_payloads(path)[1]]


def kind(rec) -> str:
    return rec.WhichOneof("record_type")


def history_step(rec) -> int:
    """A history record's `_step`."""
    for item in rec.history.item:
        if (item.key or "/".join(item.nested_key)) == "_step":
            return int(json.loads(item.value_json))
    return rec.history.step.num


def history(path: Path) -> list[dict]:
    """One dict per history row: {key: decoded value}, keys joined with '/' for nested keys."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            for rec in read_records(path) if kind(rec) == "history"]


def run_ids(path: Path) -> set[str]:
    return {rec.run.run_id for rec in read_records(path) if kind(rec) == "run"}


def config(path: Path) -> dict:
    """The run config as W&B stored it: {key: value}, merged over all config records."""
    out = {}
    for rec in read_records(path):
        if kind(rec) == "config":
            for item in rec.config.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
