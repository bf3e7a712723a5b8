"""Read an offline W&B run file (`run-*.wandb`) back, with wandb's own protobuf records.

Format (wandb 0.31; `wandb.sdk.internal.datastore`, which read it, is gone there): a 7-byte header (":W&B", version), then 32 KiB blocks
of records, each `<IHB` (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); blocks zero-padded.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = struct.Struct("<IHB")


def read_records(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, payload, records = 7, b"", []
    while pos + HEADER.size <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < HEADER.size:          # too small for a header: padding
            pos += left_in_block
            continue
        _crc, length, kind = HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:            # zero padding to the end of the block
            pos += left_in_block
            continue
        chunk = data[pos + HEADER.size: pos + HEADER.size + length]
        pos += HEADER.size + length
        payload = chunk if kind in (1, 2) else payload + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(payload)
            records.append(rec)
            payload = b""
    return records


def history(path: Path) -> list[dict]:
    """One dict per history row: {key: decoded value}, keys joined with '/' for nested keys."""
    rows = []
    for rec in read_records(path):
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def run_ids(path: Path) -> set[str]:
    return {rec.run.run_id for rec in read_records(path) if rec.WhichOneof("record_type") == "run"}


def config(path: Path) -> dict:
    """The run config as W&B stored it: {key: value}, merged over all config records."""
    out = {}
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "config":
            for item in rec.config.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
