"""The `isa` fixture of the kernel tests (a plugin of tests/conftest.py: a conftest.py here would
shadow the root one for `from conftest import ...`)."""
from __future__ import annotations

import pytest

from fade_kernels.ops import cpu

_ISAS = cpu._C.supported_isas() if cpu.cpu_available()[0] else []


@pytest.fixture(params=_ISAS)
def isa(request):
    """Force one CPU kernel family ("avx512", "avx2", "scalar": each this CPU can run) for the
    test (its int8 kernel: VNNI where the CPU has it, AVX2's vpmaddubsw, or the portable one);
    restore after."""
    before = cpu._C.active_isa()
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa(before)
