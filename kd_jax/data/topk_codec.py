"""Compressed teacher top-k caches: bit-packed token ids and quantised log-probabilities.

A top-k cache row holds, at each of its L positions, the teacher's k most likely next-token ids
and their log-probabilities lp_0 >= lp_1 >= ... (sorted, as `jax.lax.top_k` returns them). The
uncompressed format (manifest without "format", or "format": 1) stores them as uint16/int32 ids
and float32/float16 log-probs: 96 B per position at k = 16. Format 2 stores, per position:

  ids     b = ceil(log2 V) bits each (16 for V = 49,152, 18 for V = 152,064), bit-packed over
          the whole row (little-endian bit order);
  shape   the k - 1 gaps x_i = lp_0 - lp_i >= 0 (i >= 1; x_0 = 0 is not stored), companded
          c_i = round(Q (x_i / s)^(3/4)) with Q = 2^bits - 1 and s = max_i x_i rounded *up* to
          float16 (the per-position scale, 2 bytes). The decoded gap is s (c / Q)^(4/3), so
          |x - x_hat| <= (2 s / 3 Q) ((x / s)^(3/4) + 1 / (2 Q))^(1/3): finer steps at the small
          gaps, where the mass is. On SmolLM2's ShareGPT outputs the power 3/4 gave a mean KL
          error within 3 % of the lowest of {0.4, 0.5, 0.6, 0.75, 0.9, 1} (0.9); uniform codes
          (power 1) are level at k = 16, 5-10 % worse in mean at k = 64 and 128, and about 2x
          in max (benchmarks/README.md). Sorted gaps stay sorted (the rounding is monotone);
  tail    the teacher's mass outside the top-k, t = 1 - sum_i exp(lp_i), as 16 bits of its
          logit log(t / (1 - t)) on a uniform grid over [-24, 24] (step 7.3e-4: both t and the
          covered mass 1 - t to 0.04 % relative; t < 4e-11 reads as 4e-11).

Decoding (`decode_row`, on the host when the cache is read: the step gets the same int32 ids
and float32 log-probs [B, T, k] as from an uncompressed cache) restores the absolute level from
the tail: lp_hat_i = -x_hat_i + log(1 - t_hat) - logsumexp_j(-x_hat_j), so the decoded
probabilities sum to exactly 1 - t_hat. The 'renormalize' top-k loss reads only the gaps (the
softmax of the k log-probs); 'bucket' also reads the tail (see `kd_jax.losses.sparse`).

Settings (`COMPRESSIONS`): "none" (the uncompressed format, unchanged), "q16", "q8", "q4" (bits
per gap code). The scheme borrows DistillKit's ingredients (arcee-ai/DistillKit,
distillkit/compression/: ids packed at ceil(log2 V) bits, a per-group scale with few-bit codes
of monotone log-probs), without its polynomial fit; the top-1 anchor and the explicit tail mass
are ours. Everything here is NumPy on process-local rows: no device arrays are read.
"""

from __future__ import annotations

import math

import numpy as np

from kd_jax.errors import ConfigValueError, CorruptFileError

FORMAT = 2  # the manifest's "format" of a compressed cache; absent = 1 (uncompressed).
COMPRESSIONS = {"none": 0, "q16": 16, "q8": 8, "q4": 4}  # bits per log-prob gap code
POWER = 0.75  # gap companding: codes uniform in (x / s)^POWER
TAIL_LOGIT = 24.0  # the tail's logit grid spans [-TAIL_LOGIT, TAIL_LOGIT]
TAIL_LEVELS = (1 << 16) - 1
_MAX_GAP = 60000.0  # gaps are clipped here (float16 range; exp(-60000) == 0)


def compression_bits(name: str) -> int:
    """Bits per gap code of a compression setting (0 for "none"); a ConfigValueError if unknown."""
    if name not in COMPRESSIONS:
        raise ConfigValueError(
            f"generate.compression={name!r}: use one of {sorted(COMPRESSIONS)} ('none' keeps "
            "the uncompressed float cache)."
        )
    return COMPRESSIONS[name]


def id_bits(vocab_size: int) -> int:
    """Bits per packed token id: ceil(log2 V), at least 1."""
    return max(1, math.ceil(math.log2(vocab_size)))


# ------------------------------------------------------------------------------ bit packing
def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers (< 2**bits, 1 <= bits <= 32) -> uint8 [ceil(n * bits / 8)], each value's
    bits least significant first, values in C order."""
    v = np.asarray(values).reshape(-1).astype(np.uint64)
    if v.size and int(v.max()) >> bits:
        raise ConfigValueError(f"value {int(v.max())} does not fit in {bits} bits.")
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first `count` values, int64 [count]."""
    need = -(-count * bits // 8)
    if packed.size < need:
        raise CorruptFileError(
            f"packed array has {packed.size} bytes, {need} needed for {count} {bits}-bit values."
        )
    planes = np.unpackbits(np.asarray(packed, np.uint8), count=count * bits, bitorder="little")
    weights = np.left_shift(np.int64(1), np.arange(bits, dtype=np.int64))
    return planes.reshape(count, bits).astype(np.int64) @ weights


# ----------------------------------------------------------------------------- quantisation
def _scale_up(s: np.ndarray) -> np.ndarray:
    """float16 scales >= s (so every gap / scale <= 1), 1 where s = 0."""
    s16 = s.astype(np.float16)
    s16 = np.where(s16.astype(np.float64) < s, np.nextafter(s16, np.float16(np.inf)), s16)
    return np.where(s > 0, s16, np.float16(1.0))


def quantise(logprob: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted top-k log-probs [..., k] -> (gap codes uint16 [..., k - 1], scale float16 [...],
    tail code uint16 [...]). See the module docstring."""
    lp = np.asarray(logprob, np.float64)
    gaps = np.clip(lp[..., :1] - lp[..., 1:], 0.0, _MAX_GAP)
    scale = _scale_up(gaps.max(-1) if gaps.shape[-1] else np.zeros(lp.shape[:-1]))
    q = (1 << bits) - 1
    u = (gaps / scale.astype(np.float64)[..., None]) ** POWER
    codes = np.clip(np.rint(q * u), 0, q).astype(np.uint16)
    top = lp.max(-1, keepdims=True)
    covered = np.exp(top[..., 0] + np.log(np.sum(np.exp(lp - top), -1)))
    tail = np.clip(1.0 - covered, 0.0, 1.0)
    with np.errstate(divide="ignore"):
        logit = np.log(tail) - np.log1p(-tail)
    grid = (np.clip(logit, -TAIL_LOGIT, TAIL_LOGIT) + TAIL_LOGIT) / (2 * TAIL_LOGIT)
    tail_code = np.rint(grid * TAIL_LEVELS).astype(np.uint16)
    return codes, scale, tail_code


def decode_tail(tail_code: np.ndarray) -> np.ndarray:
    """Tail codes -> tail mass float64 in (0, 1)."""
    logit = tail_code.astype(np.float64) / TAIL_LEVELS * (2 * TAIL_LOGIT) - TAIL_LOGIT
    return 1.0 / (1.0 + np.exp(-logit))


def dequantise(codes: np.ndarray, scale: np.ndarray, tail_code: np.ndarray, bits: int):
    """Inverse of `quantise`: absolute log-probs float32 [..., k] whose probabilities sum to the
    decoded covered mass 1 - tail."""
    q = (1 << bits) - 1
    gaps = scale.astype(np.float64)[..., None] * (codes.astype(np.float64) / q) ** (1 / POWER)
    x = np.concatenate([np.zeros((*gaps.shape[:-1], 1)), gaps], -1)
    # logsumexp(-x) with max(-x) = 0 (x_0 = 0): no overflow, >= 0.
    level = np.log1p(-decode_tail(tail_code)) - np.log(np.sum(np.exp(-x), -1))
    return (level[..., None] - x).astype(np.float32)


# ---------------------------------------------------------------------------- record rows
def encode_row(idx: np.ndarray, logprob: np.ndarray, *, vocab_size: int, bits: int) -> dict:
    """One cache row (ids [L, k], sorted log-probs [L, k]) -> the arrays of a format-2 record."""
    codes, scale, tail = quantise(logprob, bits)
    return {
        "topk_idx_packed": pack_bits(idx, id_bits(vocab_size)),
        "topk_codes_packed": pack_bits(codes, bits),
        "topk_scale": scale,
        "topk_tail": tail,
    }


def decode_row(record: dict, *, k: int, vocab_size: int, bits: int):
    """A format-2 record -> (ids int32 [L, k], log-probs float32 [L, k])."""
    length = int(record["topk_scale"].shape[0])
    idx = unpack_bits(record["topk_idx_packed"], id_bits(vocab_size), length * k)
    if idx.size and int(idx.max()) >= vocab_size:
        raise CorruptFileError(f"a packed id {int(idx.max())} is outside the vocabulary.")
    codes = unpack_bits(record["topk_codes_packed"], bits, length * (k - 1))
    lp = dequantise(codes.reshape(length, k - 1), record["topk_scale"], record["topk_tail"], bits)
    return idx.reshape(length, k).astype(np.int32), lp


def bytes_per_position(k: int, vocab_size: int, compression: str, logprob_dtype="float32"):
    """Payload bytes per cached position (without record headers), as stored."""
    bits = compression_bits(compression)
    if not bits:
        idx_bytes = 2 if vocab_size <= 1 << 16 else 4
        return k * (idx_bytes + np.dtype(logprob_dtype).itemsize)
    return k * id_bits(vocab_size) / 8 + (k - 1) * bits / 8 + 2 + 2
