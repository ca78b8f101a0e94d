"""One shard: a Parquet file of int16 audio rows (or of a trained module's latents, `vgim encode`), each row
with its own checksum; the file's checksum is kept in ``manifest.json``.

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
MANIFEST = "manifest.json"  # beside the shards: each shard's size and checksum, per split
SCHEMA = pa.schema([("id", pa.string()), ("speaker", pa.string()), ("labels", pa.string()),
                    ("length", pa.int64()), ("audio", pa.large_binary()),  # audio: int16 little-endian
                    ("checksum", pa.uint64())])                             # row_checksum of the other fields
# A latent shard (`vgim encode`): the same fields, a row's data being its frames x channels array in the
# manifest's dtype (little-endian, frame-major), so that one checksum function covers both.
LATENT_SCHEMA = pa.schema([*SCHEMA][:3] + [("frames", pa.int64()), ("latent", pa.large_binary()),
                                           ("checksum", pa.uint64())])
ROW_GROUP = 16  # rows per Parquet row group: an undecodable page is located to within this many rows
log = logging.getLogger(__name__)


class CorruptShard(StorageFault):
    """A shard that does not match its checksums; the message names the shard and, where it can, the row."""


def row_checksum(id_: str, speaker: str, labels: str, length: int, audio: bytes) -> int:
    h = xxhash.xxh3_64()
    h.update("\0".join((id_, speaker, labels, str(length))).encode() + b"\0")
    h.update(audio)
    return h.intdigest()


def encode(rows: dict[str, list], record: dict, schema: pa.Schema = SCHEMA) -> bytes:
    """Parquet bytes for ``rows`` (every ``schema`` field but ``checksum``), with ``record`` as JSON in the
    footer. ``schema``: SCHEMA (audio) or LATENT_SCHEMA."""
    rows = dict(rows, checksum=[row_checksum(*r) for r in zip(*(rows[f] for f in schema.names[:-1]))])
    table = pa.table(rows, schema=schema).replace_schema_metadata({"vgim": json.dumps(record)})
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
    # One thread, no read-ahead: a damaged page then fails at the same row every time, and no Arrow pool
    # thread is left decoding when the process exits (a pool thread alive at exit aborts the process with
    # "terminate called without an active exception").
    try:
        f = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False)
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
            t = f.read_row_group(g, use_threads=False)
        except Exception as e:  # noqa: BLE001
            raise CorruptShard(f"shard {name}: rows {first}-{first + n - 1} cannot be decoded ({_line(e)})") from None
        fields = (t.column(c).to_pylist() for c in t.schema.names)     # SCHEMA's or LATENT_SCHEMA's
        for r, (*row, stored) in enumerate(zip(*fields)):
            if row_checksum(*row) != stored:
                raise CorruptShard(f"shard {name}: row {first + r} (id {row[0]!r}) does not match its checksum")
        groups.append(t)
        first += n
    return pa.concat_tables(groups) if groups else f.schema_arrow.empty_table()


def _line(e: Exception) -> str:
    return " ".join(str(e).split())
