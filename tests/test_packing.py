"""Bit-exact packing round trips against a deliberately naive pure-Python packer."""
import pytest
import torch

from fade_kernels.packing import (pack_codes, pack_qweight, pack_qzeros, unpack_codes, unpack_qweight,
                                  unpack_qzeros)


def naive_pack(column: list[int], bits: int) -> list[int]:
    """One column of codes -> int32 words, bit by bit, through a Python integer bit stream."""
    stream = 0
    for index, code in enumerate(column):
        for bit in range(bits):
            if (code >> bit) & 1:
                stream |= 1 << (index * bits + bit)
    n_words = len(column) * bits // 32
    words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(n_words)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("length", [32, 96])
def test_pack_matches_naive_packer(bits, length):
    codes = torch.randint(0, 2 ** bits, (length, 5))
    codes[0, 0], codes[-1, 0] = 0, 2 ** bits - 1           # extremes
    codes[:, 1] = 2 ** bits - 1                              # all ones: every word's sign bit set
    packed = pack_codes(codes, bits, dim=0)
    assert packed.dtype == torch.int32
    expected = torch.tensor([naive_pack(codes[:, c].tolist(), bits) for c in range(5)], dtype=torch.int32).t()
    assert torch.equal(packed, expected)
    assert torch.equal(unpack_codes(packed, bits, dim=0), codes.to(torch.int32))


def test_three_bit_straddling_values_follow_the_diagram():
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10, 0] = 0b101   # low 2 bits (01) -> word 0 bits 30-31, high bit -> word 1 bit 0
    codes[21, 0] = 0b011   # low bit -> word 1 bit 31, high 2 bits (01) -> word 2 bits 0-1
    words = [w & 0xFFFFFFFF for w in pack_codes(codes, 3)[:, 0].tolist()]
    assert words[0] == 0b01 << 30
    assert words[1] == (1 << 0) | (1 << 31)
    assert words[2] == 0b01


@pytest.mark.parametrize("bits", [3, 4])
def test_pack_along_dim1_and_layer_helpers(bits):
    n, k, groups = 40, 64, 2     # N not a multiple of 32: qzeros pads it
    codes = torch.randint(0, 2 ** bits, (n, k))
    zeros = torch.randint(0, 2 ** bits, (n, groups))
    qweight = pack_qweight(codes, bits)
    assert qweight.shape == (k * bits // 32, n)
    assert torch.equal(unpack_qweight(qweight, bits), codes.int())
    qzeros = pack_qzeros(zeros, bits)
    assert qzeros.shape == (groups, 64 * bits // 32)
    assert torch.equal(unpack_qzeros(qzeros, bits, n), zeros.int())


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_codes(torch.zeros(32, 1, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_codes(torch.zeros(16, 1, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        pack_codes(torch.full((8, 1), 16), 4)
