"""Sharded on-disk records with checksums: what the teacher-generation stage and the top-k
teacher cache write, and what `orca_chat` reads back.

One shard file (`.kdrec`):
  header  b"KDREC1\\n\\0"                                     (8 bytes)
  records u64 payload length | u32 crc32(payload) | payload   (repeated)
  footer  b"KDEND1\\n\\0" | u64 record count | u32 crc32 of all record crcs | u32 0  (24 bytes)
A payload is u32 n | n bytes of JSON {"meta": ..., "arrays": {name: [dtype, shape]}} | the
arrays' raw C-order bytes in that order. Shards are written to `<name>.partial` and renamed
when complete, so a crash never leaves a truncated file under a final name; a shard that was cut
or altered later fails its checks with a `CorruptShardError` that names the file and the fix.

A dataset is a directory: `manifest.json` (kind, number of shards, provenance) and shards
`<prefix>-<i:05d>-of-<n:05d>.kdrec`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterable

import numpy as np

from kd_jax.data import topk_codec
from kd_jax.errors import ConfigValueError, CorruptFileError, UserFileNotFoundError

log = logging.getLogger("kd_jax")

MAGIC = b"KDREC1\n\0"
END = b"KDEND1\n\0"
_REC = struct.Struct("<QI")
_FOOT = struct.Struct("<8sQII")
MANIFEST = "manifest.json"
SUFFIX = ".kdrec"


class CorruptShardError(CorruptFileError, IOError):
    """A shard failed its header, length, checksum or footer check."""


def _fix(path: str) -> str:
    return (
        f"Delete {path} and rerun the stage that wrote it: it writes the missing shards again "
        "and keeps the intact ones."
    )


def encode(record: dict) -> bytes:
    """One record -> payload bytes. NumPy arrays are stored raw; everything else must be JSON."""
    meta, arrays, blobs = {}, {}, []
    for k, v in record.items():
        if isinstance(v, np.ndarray):
            v = np.ascontiguousarray(v)
            arrays[k] = [v.dtype.str, list(v.shape)]
            blobs.append(v.tobytes())
        else:
            meta[k] = v
    head = json.dumps({"meta": meta, "arrays": arrays}, separators=(",", ":")).encode()
    return struct.pack("<I", len(head)) + head + b"".join(blobs)


def decode(payload: bytes) -> dict:
    (n,) = struct.unpack_from("<I", payload)
    head = json.loads(payload[4 : 4 + n])
    out, at = dict(head["meta"]), 4 + n
    for k, (dtype, shape) in head["arrays"].items():
        dt = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        out[k] = np.frombuffer(payload, dt, count=size // dt.itemsize, offset=at).reshape(shape)
        at += size
    return out


def write_shard(path: str, records: Iterable[dict]) -> int:
    """Writes `records` to `path` atomically (via `path.partial`); -> bytes written."""
    tmp = path + ".partial"
    crcs, count = [], 0
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        for r in records:
            payload = encode(r)
            crc = zlib.crc32(payload)
            f.write(_REC.pack(len(payload), crc))
            f.write(payload)
            crcs.append(crc)
            count += 1
        all_crc = zlib.crc32(np.asarray(crcs, "<u4").tobytes())
        f.write(_FOOT.pack(END, count, all_crc, 0))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return os.path.getsize(path)


def read_shard(path: str) -> list[dict]:
    """All records of one shard, after checking header, every record's crc32 and the footer."""
    with open(path, "rb") as f:
        data = f.read()

    def bad(why: str) -> CorruptShardError:
        e = CorruptShardError(f"Corrupt or partial record shard {path}: {why}. {_fix(path)}")
        e.why = why
        return e

    if data[: len(MAGIC)] != MAGIC:
        raise bad("bad header (not a kd_jax record shard, or overwritten)")
    if len(data) < len(MAGIC) + _FOOT.size:
        raise bad(f"only {len(data)} bytes, no footer (truncated)")
    end, count, all_crc, _ = _FOOT.unpack_from(data, len(data) - _FOOT.size)
    if end != END:
        raise bad("no footer at the end of the file (truncated or appended to)")
    body_end, at, out, crcs = len(data) - _FOOT.size, len(MAGIC), [], []
    while at < body_end:
        if at + _REC.size > body_end:
            raise bad(f"record {len(out)} header cut off at byte {at}")
        length, crc = _REC.unpack_from(data, at)
        at += _REC.size
        if at + length > body_end:
            raise bad(f"record {len(out)} claims {length} bytes but the file ends first")
        payload = data[at : at + length]
        if zlib.crc32(payload) != crc:
            raise bad(f"record {len(out)} (bytes {at}..{at + length}) fails its crc32 check")
        out.append(decode(payload))
        crcs.append(crc)
        at += length
    if len(out) != count or zlib.crc32(np.asarray(crcs, "<u4").tobytes()) != all_crc:
        raise bad(f"footer says {count} records, found {len(out)} (records missing or reordered)")
    return out


# ------------------------------------------------------------------------------- datasets
def shard_path(directory: str, prefix: str, i: int, n: int) -> str:
    return os.path.join(directory, f"{prefix}-{i:05d}-of-{n:05d}{SUFFIX}")


def write_manifest(directory: str, manifest: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, MANIFEST + ".partial")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(directory, MANIFEST))


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise UserFileNotFoundError(
            f"No record dataset at {directory}: expected {MANIFEST} and shards "
            f"<prefix>-00000-of-NNNNN{SUFFIX} written by a 'generate' or 'topk_cache' stage "
            "(stage kind generate or topk_cache); run that stage first."
        )
    with open(path) as f:
        return json.load(f)


def all_shard_paths(directory: str) -> list[str]:
    """Every shard path the manifest lists, present or not."""
    m = read_manifest(directory)
    return [shard_path(directory, m["prefix"], i, m["num_shards"]) for i in range(m["num_shards"])]


def missing_shards(directory: str) -> list[str]:
    """The manifest's shards that are not on disk (e.g. deleted after a CorruptShardError)."""
    return [p for p in all_shard_paths(directory) if not os.path.isfile(p)]


def shard_paths(directory: str) -> list[str]:
    """The dataset's shard paths in order; a missing shard is an error naming it."""
    paths = all_shard_paths(directory)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserFileNotFoundError(
            f"Record dataset {directory} is incomplete: {len(missing)} of {len(paths)} shards "
            f"missing (first: {missing[0]}). Rerun the stage that writes it; it writes only the "
            "missing shards."
        )
    return paths


def discard_if_corrupt(path: str) -> bool:
    """True when the finished shard `path` passes its checks. A corrupt one is renamed to
    `<path>.corrupt` (kept for inspection, never read again) with a warning naming it, and False
    is returned, so the writing stage regenerates it."""
    try:
        read_shard(path)
        return True
    except CorruptShardError as e:
        os.replace(path, path + ".corrupt")
        why = getattr(e, "why", e)
        log.warning("record shard %s is corrupt (%s); moved it to %s.corrupt", path, why, path)
        return False


def read_dataset(directory: str) -> list[dict]:
    """Every record of a dataset directory, shard by shard, each shard checked."""
    return [r for p in shard_paths(directory) for r in read_shard(p)]


def fingerprint(array: np.ndarray) -> str:
    a = np.ascontiguousarray(array)
    return hashlib.sha1(str((a.dtype.str, a.shape)).encode() + a.tobytes()).hexdigest()[:20]


def read_topk_cache(directory: str, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(teacher_topk_idx int32 [N, L, k], teacher_topk_logprob float32 [N, L, k]) of a top-k cache
    written for exactly these packed rows `input_ids` [N, L] (checked by fingerprint). The
    manifest's "format" says how rows are stored: absent or 1, raw ids and float log-probs; 2,
    compressed (`kd_jax.data.topk_codec`, decoded here on the host to the same arrays)."""
    m = read_manifest(directory)
    if m.get("kind") != "topk_cache":
        raise ConfigValueError(f"{directory} holds a '{m.get('kind')}' dataset, not a top-k cache.")
    want = fingerprint(np.asarray(input_ids, np.int32))
    if m["rows_fingerprint"] != want:
        raise ConfigValueError(
            f"Top-k cache {directory} was built for other rows (fingerprint "
            f"{m['rows_fingerprint']}, {m['rows']} rows) than this dataset's ({want}, "
            f"{len(input_ids)} rows): the data settings changed. Delete the directory and rerun "
            "the topk_cache stage."
        )
    fmt = m.get("format", 1)  # absent: the uncompressed format of the first caches
    if fmt not in (1, topk_codec.FORMAT):
        raise CorruptFileError(
            f"Top-k cache {directory} has format {fmt!r}; this kd_jax reads formats 1 and "
            f"{topk_codec.FORMAT}. Rerun the topk_cache stage with this kd_jax (or upgrade it)."
        )
    recs = read_dataset(directory)
    order = np.argsort([r["row"] for r in recs])
    if [recs[i]["row"] for i in order] != list(range(len(input_ids))):
        raise CorruptFileError(f"Top-k cache {directory} does not hold exactly one record per row.")
    if fmt == 1:
        idx = np.stack([recs[i]["topk_idx"] for i in order]).astype(np.int32)
        lp = np.stack([recs[i]["topk_logprob"] for i in order]).astype(np.float32)
        return idx, lp
    # Compressed (kd_jax.data.topk_codec): decoded here, on the host, row by row.
    bits = topk_codec.compression_bits(m["compression"])
    rows = [
        topk_codec.decode_row(recs[i], k=m["k"], vocab_size=m["vocab_size"], bits=bits)
        for i in order
    ]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
