"""Take .tkz files apart and put them back together, for tests that damage payloads on purpose.

A flipped bit in a payload stops at the chunk's CRC; :func:`mutate_payloads`
recomputes the framing after the change, so a fuzz test reaches the codec's
own payload parser instead.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

from toolkit.codecs import container


@dataclass
class Record:
    method: int  # container.METHOD_CODEC, METHOD_ZSTD or METHOD_STORED
    raw_len: int
    payload: bytes


@dataclass
class TkzFile:
    head: bytes  # magic, version and header, verbatim
    header: dict
    records: list[Record]
    digest: bytes

    def to_bytes(self) -> bytes:
        out = bytearray(self.head)
        for r in self.records:
            out += container._record(r.method, r.raw_len, r.payload) + r.payload
        return bytes(out) + container.varint(container.TAG_END) + self.digest


def parse(blob: bytes) -> TkzFile:
    """Split a valid .tkz file into its header bytes, records and digest."""
    src = io.BytesIO(blob)
    header = container._read_header(src)
    head = blob[: src.tell()]
    records, digest = [], b""
    for rec in container._iter_records(src, header["chunk_size"]):
        if isinstance(rec, container._Chunk):
            records.append(Record(rec.method, rec.raw_len, rec.payload))
        else:
            digest = rec.digest
    return TkzFile(head, header, records, digest)


def mutate_payloads(blob: bytes, mutate: Callable[[int, bytes], bytes]) -> bytes:
    """``blob`` with each codec payload replaced by ``mutate(chunk index, payload)`` and every
    payload length and CRC recomputed (the content digest stays: it is of the original bytes)."""
    f = parse(blob)
    for i, r in enumerate(f.records):
        if r.method == container.METHOD_CODEC:
            r.payload = mutate(i, r.payload)
    return f.to_bytes()
