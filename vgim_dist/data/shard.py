"""One shard: a Parquet file of int16 audio rows, each row with its own checksum; the file's checksum is kept
in ``manifest.json``.

The file checksum makes verifying a whole shard one fast pass over its bytes. The row checksums say which
row is damaged when it fails, and let a shard be verified where no manifest lists it yet (a re-run of
``vgim data prepare`` after an interruption).
"""

from __future__ import annotations

import io
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from vgim_dist.storage import StorageFault, checksum

FORMAT_VERSION = 2
SCHEMA = pa.schema([("id", pa.string()), ("speaker", pa.string()), ("labels", pa.string()),
                    ("length", pa.int64()), ("audio", pa.large_binary()),  # audio: int16 little-endian
                    ("checksum", pa.uint64())])                             # row_checksum of the other fields
ROW_GROUP = 16  # rows per Parquet row group: an undecodable page is located to within this many rows
log = logging.getLogger(__name__)


class CorruptShard(StorageFault):
    """A shard that does not match its checksums; the message names the shard and, where it can, the row."""


def row_checksum(id_: str, speaker: str, labels: str, length: int, audio: bytes) -> int:
    h = xxhash.xxh3_64()
    h.update("\0".join((id_, speaker, labels, str(length))).encode() + b"\0")
    h.update(audio)
    return h.intdigest()


def encode(rows: dict[str, list], record: dict) -> bytes:
    """Parquet bytes for ``rows`` (every SCHEMA field but ``checksum``), with ``record`` as JSON in the footer."""
    rows = dict(rows, checksum=[row_checksum(*r) for r in zip(*(rows[f] for f in SCHEMA.names[:-1]))])
    table = pa.table(rows, schema=SCHEMA).replace_schema_metadata({"vgim": json.dumps(record)})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP)
    return buf.getvalue()


def footer_record(data: bytes) -> dict | None:
    """The record ``encode`` put in the footer, or None when the footer is unreadable or foreign."""
    try:
        return json.loads(pq.read_metadata(pa.BufferReader(data)).metadata[b"vgim"])
    except Exception:  # noqa: BLE001 - a truncated or foreign file is simply not one of ours
        return None


def decode(name: str, data: bytes, want: str | None) -> pa.Table:
    """The shard's rows, verified: against the file checksum ``want`` (from the manifest) when given, else row
    by row. Raises CorruptShard naming ``name`` and the first damaged row."""
    if want is not None and checksum(data) == want:
        return pq.read_table(pa.BufferReader(data))
    table = _verified_rows(name, data)
    if want is not None:
        raise CorruptShard(f"shard {name}: file checksum mismatch, yet every row matches its own checksum "
                           "(damage in the Parquet footer or page headers)")
    return table


def _verified_rows(name: str, data: bytes) -> pa.Table:
    try:
        f = pq.ParquetFile(pa.BufferReader(data))
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged footer
        raise CorruptShard(f"shard {name}: footer unreadable, no row can be located ({_line(e)})") from None
    if "checksum" not in f.schema_arrow.names:
        log.warning("shard %s has no checksums (prepared by an older version): read unverified; re-run "
                    "`vgim data prepare` to add them", name)
        return f.read()
    groups, first = [], 0
    for g in range(f.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        try:
            t = f.read_row_group(g)
        except Exception as e:  # noqa: BLE001
            raise CorruptShard(f"shard {name}: rows {first}-{first + n - 1} cannot be decoded ({_line(e)})") from None
        fields = (t.column(c).to_pylist() for c in SCHEMA.names)
        for r, (*row, stored) in enumerate(zip(*fields)):
            if row_checksum(*row) != stored:
                raise CorruptShard(f"shard {name}: row {first + r} (id {row[0]!r}) does not match its checksum")
        groups.append(t)
        first += n
    return pa.concat_tables(groups) if groups else f.schema_arrow.empty_table()


def _line(e: Exception) -> str:
    return " ".join(str(e).split())
