"""The CUDA decode GEMV without a GPU: its arithmetic, replayed on the host, against torch.

csrc/cuda/qgemv_core.h holds the kernel's decomposition and arithmetic as host+device functions;
tests/ops/test_cuda_qgemv_emulator.cpp replays qgemv_kernel's block / chunk / warp / lane order
with them (and the launcher's argument check). It is compiled here with the host C++ compiler
(about a second) and called through ctypes. The same build runs the shared bitpack.h scalar
unpack helpers against fade_kernels.packing. Device-only code (staging loads, barriers, the final
store) is compiled, not run: python/check_cuda_compile.sh.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fade_kernels.ops.reference import dequantize_weight
from fade_kernels.packing import pack_codes, pack_qweight, pack_qzeros

# Builds the CUDA kernel as a host library with the C++ compiler, once per module.
pytestmark = [pytest.mark.compile]


ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).with_name("test_cuda_qgemv_emulator.cpp")

F16, BF16, F32 = 0, 1, 2
DTYPES = {torch.float16: F16, torch.bfloat16: BF16, torch.float32: F32}
STATUS = {"ok": 0, "bits": 1, "rows": 2, "k": 3, "n": 4, "group": 5, "dtype": 6, "null": 7, "launch": 8}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no host C++ compiler ({cxx}) to build the CUDA kernel's host replay")
    lib = tmp_path_factory.mktemp("qgemv_emu") / "libqgemv_emu.so"
    # -Wall -Wextra -Werror: qgemv_core.h and bitpack.h must also be clean for host compilers.
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
           f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'cuda'}", str(SOURCE), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"building the host replay failed:\n{' '.join(cmd)}\n{done.stderr}"
    so = ctypes.CDLL(str(lib))
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    so.emu_qgemv.argtypes = [p, i32, p, p, p, p, p, i32, i32, i32, i32, i32]
    so.emu_qgemv.restype = i32
    so.emu_error_string.argtypes = [i32]
    so.emu_error_string.restype = ctypes.c_char_p
    so.emu_unpack_run.argtypes = [p, i32, p]
    so.emu_unpack3.argtypes = [p, i32]
    so.emu_unpack3.restype = ctypes.c_uint32
    so.emu_unpack4.argtypes = [ctypes.c_uint32, i32]
    so.emu_unpack4.restype = ctypes.c_uint32
    so.emu_unpack_code.argtypes = [p, i64, i64, i32]
    so.emu_unpack_code.restype = ctypes.c_uint32
    so.emu_half_bits_to_float.argtypes = [ctypes.c_uint16]
    so.emu_half_bits_to_float.restype = ctypes.c_float
    return so


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def run_emu(so, x, qweight, qzeros, scales, bias, bits, group_size, n=None):
    """(status, y float32 [M, N]) from the host replay; x [M, K] fp16/bf16/fp32."""
    m, k = x.shape
    n = qweight.shape[1] if n is None else n
    y = torch.full((m, max(n, 0)), float("nan"), dtype=torch.float32)
    status = so.emu_qgemv(_ptr(x), DTYPES.get(x.dtype, 99), _ptr(qweight), _ptr(qzeros),
                          _ptr(scales.view(torch.int16)), _ptr(bias), _ptr(y), m, k, n, group_size, bits)
    return status, y


def make_layer(gen, n, k, bits, group_size, extreme=None):
    """Random packed layer: (qweight, qzeros, scales fp16, W float64 (N, K))."""
    g = k // group_size
    top = 2 ** bits - 1
    if extreme == "max":
        codes, zeros = torch.full((n, k), top, dtype=torch.int32), torch.zeros(n, g, dtype=torch.int32)
    elif extreme == "min":
        codes, zeros = torch.zeros(n, k, dtype=torch.int32), torch.full((n, g), top, dtype=torch.int32)
    else:
        codes = torch.randint(0, top + 1, (n, k), generator=gen, dtype=torch.int32)
        zeros = torch.randint(0, top + 1, (n, g), generator=gen, dtype=torch.int32)
    scales = (torch.rand(n, g, generator=gen) * 0.02 + 0.001).half()
    qweight, qzeros, scales_gn = pack_qweight(codes, bits), pack_qzeros(zeros, bits), scales.t().contiguous()
    g_idx = (torch.arange(k) // group_size).to(torch.int32)
    w = dequantize_weight(qweight, qzeros, scales_gn, g_idx, bits, n).double()  # exact: (q - z) * s in fp32
    return qweight, qzeros, scales_gn, w


def check_against_float64(y, x, w, bias, what):
    """|y - truth| <= 2 * torch's own fp32 error (max over the output) + atol 1e-6 * scale."""
    truth = x.double() @ w.t() + (0 if bias is None else bias.double())
    torch_err = (torch.nn.functional.linear(x.float(), w.float(), bias).double() - truth).abs().max().item()
    err = (y.double() - truth).abs().max().item()
    atol = 1e-6 * max(truth.abs().max().item(), 1.0)
    assert err <= 2 * torch_err + atol, f"{what}: error {err:.3g} vs torch fp32 error {torch_err:.3g}"


# ---- bitpack.h scalar helpers ---------------------------------------------------------------

@pytest.mark.parametrize("bits", [3, 4])
def test_bitpack_scalar_unpack_matches_packing(emu, bits, _fresh_seed):
    gen = torch.Generator().manual_seed(_fresh_seed)
    k, n = 96, 5
    codes = torch.randint(0, 2 ** bits, (k, n), generator=gen, dtype=torch.int32)
    codes[:32, 0] = 2 ** bits - 1  # every word of a run with bit 31 set (the sign bit of int32)
    packed = pack_codes(codes, bits, dim=0)                                   # [k*bits/32, n]
    col_major = packed.t().contiguous()                                       # one column's words contiguous
    out = torch.zeros(32, dtype=torch.uint8)
    for c in range(n):
        for run in range(k // 32):
            words = col_major[c, run * bits:(run + 1) * bits].contiguous()
            emu.emu_unpack_run(words.data_ptr(), bits, out.data_ptr())
            assert torch.equal(out.to(torch.int32), codes[run * 32:(run + 1) * 32, c])
            for i in range(32):
                got = emu.emu_unpack3(words.data_ptr(), i) if bits == 3 else \
                    emu.emu_unpack4(int(words[i // 8]) & 0xFFFFFFFF, i % 8)
                assert got == codes[run * 32 + i, c], (c, run, i)
        # Any index along a strided column (the GPTQ layout: words N apart), as qzeros is read.
        col = packed[:, c:]
        for i in range(k):
            assert emu.emu_unpack_code(col.data_ptr(), n, i, bits) == codes[i, c], (c, i)


def test_half_conversion_is_exact_for_every_non_nan_half(emu):
    halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    want = halves.view(torch.float16).float()
    got = torch.tensor([emu.emu_half_bits_to_float(int(h) & 0xFFFF) for h in halves.tolist()])
    keep = ~want.isnan()
    assert torch.equal(got[keep], want[keep]) and got[~keep].isnan().all()


# ---- the GEMV ---------------------------------------------------------------------------------

# K: 288/416 Moonshine widths (9 and 13 runs: rpw 2, warps partly idle), 1312 (41 runs: two
# chunks, the second ragged), 2048 (two full chunks); N: not multiples of the 32-column block.
SHAPES = [(288, 72, 32), (416, 40, 32), (1312, 33, 32), (2048, 64, 128), (384, 96, 384)]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("k,n,group_size", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8])
def test_replay_matches_float64_fp32_activations(emu, bits, k, n, group_size, m, _fresh_seed):
    gen = torch.Generator().manual_seed(_fresh_seed)
    qweight, qzeros, scales, w = make_layer(gen, n, k, bits, group_size)
    x = torch.randn(m, k, generator=gen) + 0.5  # a non-zero mean, as after GELU
    bias = torch.randn(n, generator=gen) if m != 3 else None
    status, y = run_emu(emu, x, qweight, qzeros, scales, bias, bits, group_size)
    assert status == 0
    check_against_float64(y, x, w, bias, f"bits={bits} M={m} K={k} N={n} g={group_size}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("m", [2, 5])
def test_replay_half_activations(emu, dtype, bits, m, _fresh_seed):
    """16-bit x is widened exactly and accumulated in fp32: the fp32 bound holds before the
    final rounding, and after it the result is as close as torch's own 16-bit linear."""
    gen = torch.Generator().manual_seed(_fresh_seed)
    k, n, group_size = 416, 72, 32
    qweight, qzeros, scales, w = make_layer(gen, n, k, bits, group_size)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen)
    status, y = run_emu(emu, x, qweight, qzeros, scales, bias, bits, group_size)
    assert status == 0
    check_against_float64(y, x, w, bias, f"{dtype} bits={bits} M={m}")
    truth = x.double() @ w.t() + bias.double()
    torch_err = (torch.nn.functional.linear(x, w.to(dtype), bias.to(dtype)).double() - truth).abs().max()
    assert (y.to(dtype).double() - truth).abs().max() <= 2 * torch_err


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("extreme", ["max", "min"])
def test_replay_extreme_codes_and_zeros(emu, bits, extreme, _fresh_seed):
    gen = torch.Generator().manual_seed(_fresh_seed)
    k, n, group_size = 256, 40, 64
    qweight, qzeros, scales, w = make_layer(gen, n, k, bits, group_size, extreme)
    x = torch.randn(4, k, generator=gen)
    status, y = run_emu(emu, x, qweight, qzeros, scales, None, bits, group_size)
    assert status == 0
    check_against_float64(y, x, w, None, f"{extreme} bits={bits}")


def test_argument_errors_return_codes_with_messages(emu, _fresh_seed):
    gen = torch.Generator().manual_seed(_fresh_seed)
    qweight, qzeros, scales, _ = make_layer(gen, 32, 64, 4, 32)
    x = torch.randn(1, 64)

    def status(**kw):
        args = dict(x=x, qweight=qweight, qzeros=qzeros, scales=scales, bias=None, bits=4, group_size=32)
        n = kw.pop("n", None)
        args.update(kw)
        return run_emu(emu, n=n, **args)[0]

    assert status() == STATUS["ok"]
    assert status(bits=2) == STATUS["bits"]
    assert status(x=torch.randn(9, 64)) == STATUS["rows"]
    assert status(x=torch.randn(1, 48)) == STATUS["k"]
    assert status(n=0) == STATUS["n"]
    assert status(group_size=48) == STATUS["group"]
    assert status(group_size=128) == STATUS["group"]  # does not divide K = 64
    assert status(x=x.double()) == STATUS["dtype"]
    y = torch.empty(1, 32)
    assert emu.emu_qgemv(None, F32, qweight.data_ptr(), qzeros.data_ptr(), scales.data_ptr(), None, y.data_ptr(),
                         1, 64, 32, 32, 4) == STATUS["null"]
    messages = {code: emu.emu_error_string(code).decode() for code in STATUS.values()}
    assert messages[STATUS["bits"]] == "bits must be 3 or 4"
    assert "between 1 and 8" in messages[STATUS["rows"]]
    assert "multiple of 32 that divides K" in messages[STATUS["group"]]
    assert len(set(messages.values())) == len(STATUS)  # one distinct message per code
    assert emu.emu_error_string(12345).decode() == "unknown fade_qgemv status code"
