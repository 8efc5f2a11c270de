"""Bit packing in the GPTQ checkpoint layout (docs/methods.md §9).

Every width packs its codes as one little-endian bit stream: code i of a run occupies stream
bits [i*b, i*b + b), and stream bit p lives in word p // 32 at bit p % 32. Widths that divide 32
(2, 4, 8) never straddle a word. 3-bit packs 32 codes into 3 words, and two codes straddle:

  word 0  bit: 31 30|29 27|26 24|...|5  3|2  0
               [c10 ]|[ c9 ]|[ c8 ]|...|[ c1 ]|[ c0 ]      c10 bits 0-1 -> word0 bits 30-31
  word 1  bit: 31|30 28|...|3  1|0
               c21|[c20 ]|...|[c11 ]|c10                     c10 bit 2    -> word1 bit 0
                                                             c21 bit 0    -> word1 bit 31
  word 2  bit: 31 29|...|4  2|1 0
               [c31 ]|...|[c22 ]|c21                          c21 bits 1-2 -> word2 bits 0-1

So c0..c9 sit in word 0 bits 0-29, c11..c20 in word 1 bits 1-30, c22..c31 in word 2 bits 2-31.

Layout of the tensors (K inputs, N outputs, G = K / group_size groups):
  qweight int32 [K * b / 32, N]  codes packed along the input dimension (dim 0)
  qzeros  int32 [G, ceil(N / 32) * b]  zero points packed along the output dimension (dim 1);
          N is padded up to a multiple of 32 with zero codes so every width packs whole words
  scales  float16 [G, N]
Words are stored as int32 with the two's-complement wrap, so the sign bit is an ordinary bit.
"""
from __future__ import annotations

import torch

from fade_kernels.config import SUPPORTED_BITS


def codes_per_run(bits: int) -> tuple[int, int]:
    """(codes, words) of the smallest run that fills whole int32 words: (32, 3) for 3-bit."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return (32, 3) if bits == 3 else (32 // bits, 1)


def _to_int32(words64: torch.Tensor) -> torch.Tensor:
    # Wrap unsigned 32-bit values into int32 two's complement (bit 31 becomes the sign bit).
    words64 = words64 & 0xFFFFFFFF
    return torch.where(words64 >= 2 ** 31, words64 - 2 ** 32, words64).to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack unsigned `bits`-bit codes along `dim` into int32 words.

    codes: integer tensor (2-D), values in [0, 2^bits - 1]; its size along `dim` must be a
    multiple of the run length (32 for 3-bit, 32 / bits otherwise).
    Returns int32 with size (codes.shape[dim] * bits / 32) along `dim`.
    """
    n_codes, n_words = codes_per_run(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    moved = codes.movedim(dim, 0).to(torch.int64)
    length, width = moved.shape
    if length % n_codes != 0:
        raise ValueError(
            f"codes has {length} values along dim {dim}; {bits}-bit packing needs a multiple of {n_codes}"
        )
    if moved.numel() and (int(moved.min()) < 0 or int(moved.max()) > 2 ** bits - 1):
        raise ValueError(f"codes must lie in [0, {2 ** bits - 1}] for bits={bits}")
    runs = moved.reshape(length // n_codes, n_codes, width)
    words = torch.zeros(length // n_codes, n_words, width, dtype=torch.int64, device=codes.device)
    for i in range(n_codes):
        bit = i * bits
        word, shift = divmod(bit, 32)
        words[:, word] |= runs[:, i] << shift
        spill = shift + bits - 32
        if spill > 0:  # the code straddles into the next word: its high bits start at bit 0
            words[:, word + 1] |= runs[:, i] >> (bits - spill)
    packed = _to_int32(words.reshape(length // n_codes * n_words, width))
    return packed.movedim(0, dim).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Inverse of pack_codes: int32 words -> int32 codes in [0, 2^bits - 1] along `dim`."""
    n_codes, n_words = codes_per_run(bits)
    moved = packed.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    length, width = moved.shape
    if length % n_words != 0:
        raise ValueError(f"packed has {length} words along dim {dim}; {bits}-bit needs a multiple of {n_words}")
    runs = moved.reshape(length // n_words, n_words, width)
    mask = 2 ** bits - 1
    codes = torch.empty(length // n_words, n_codes, width, dtype=torch.int64, device=packed.device)
    for i in range(n_codes):
        word, shift = divmod(i * bits, 32)
        value = runs[:, word] >> shift
        spill = shift + bits - 32
        if spill > 0:
            value = value | (runs[:, word + 1] << (bits - spill))
        codes[:, i] = value & mask
    return codes.reshape(length // n_words * n_codes, width).to(torch.int32).movedim(0, dim).contiguous()


def padded_width(n: int) -> int:
    """N rounded up to a multiple of 32, the run length every width packs along dim 1."""
    return (n + 31) // 32 * 32


def pack_qweight(codes_nk: torch.Tensor, bits: int) -> torch.Tensor:
    """codes int (N, K) -> qweight int32 [K * bits / 32, N]."""
    return pack_codes(codes_nk.t(), bits, dim=0)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight int32 [K * bits / 32, N] -> codes int32 (N, K)."""
    return unpack_codes(qweight, bits, dim=0).t().contiguous()


def pack_qzeros(zeros_ng: torch.Tensor, bits: int) -> torch.Tensor:
    """zeros int (N, G) -> qzeros int32 [G, padded_width(N) * bits / 32], pad codes are 0."""
    zeros_gn = zeros_ng.t().to(torch.int64)
    n = zeros_gn.shape[1]
    pad = padded_width(n) - n
    if pad:
        zeros_gn = torch.nn.functional.pad(zeros_gn, (0, pad))
    return pack_codes(zeros_gn, bits, dim=1)


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """qzeros int32 [G, padded_width(N) * bits / 32] -> zeros int32 (N, G)."""
    return unpack_codes(qzeros, bits, dim=1)[:, :out_features].t().contiguous()


def check_trivial_g_idx(g_idx: torch.Tensor | None, in_features: int, group_size: int, backend: str = "the") -> None:
    """Raise unless g_idx is None or arange(K) // group_size, the only column order the kernels read.

    g_idx: int [K] or None. Act-order checkpoints quantized with static groups have a trivial g_idx;
    a permuted one would need a gather of x per call, which no backend does. backend names the
    kernels in the message.
    """
    if g_idx is None:
        return
    if tuple(g_idx.shape) != (in_features,):
        raise ValueError(f"g_idx must have shape [K={in_features}], got {tuple(g_idx.shape)}")
    trivial = torch.arange(in_features, device=g_idx.device) // group_size
    if not torch.equal(g_idx.to(trivial.dtype), trivial):
        raise ValueError(
            f"g_idx must be the trivial arange(K) // group_size with group_size={group_size}: {backend} kernels read "
            "static groups only (quantize act-order models with static groups, which keeps g_idx trivial)")
