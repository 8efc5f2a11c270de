"""retain_freed_memory: large buffers come from the reusable heap inside the block, from fresh
mappings outside it, and the defaults come back on exit."""
import pytest
import torch

from fade_kernels.memory.heap import mallinfo2, retain_freed_memory

pytestmark = pytest.mark.skipif(mallinfo2() is None, reason="needs glibc >= 2.33 (mallinfo2)")

BUFFER_BYTES = 48 << 20   # above glibc's largest mmap threshold (32 MB)


def _mapped_bytes_while_holding_buffer() -> int:
    """Bytes glibc serves from mmap while one fresh buffer is alive, minus before.

    The buffer is larger than all free heap memory (earlier tests leave free chunks that glibc
    reuses whatever the settings), so it must come from a new mapping or from growing the heap:
    which of the two is what the settings decide. torch.empty touches no page, so it is cheap."""
    size = BUFFER_BYTES + mallinfo2().fordblks
    before = mallinfo2().hblkhd
    buffer = torch.empty(size, dtype=torch.uint8)
    during = mallinfo2().hblkhd
    del buffer
    return during - before


def test_large_buffers_come_from_the_heap_only_inside_the_block(monkeypatch):
    monkeypatch.delenv("FADE_RETAIN_FREED_MEMORY", raising=False)
    assert _mapped_bytes_while_holding_buffer() >= BUFFER_BYTES
    with retain_freed_memory() as active:
        assert active
        assert _mapped_bytes_while_holding_buffer() == 0
        with retain_freed_memory() as nested:   # nesting keeps the setting until the outer exit
            assert nested
        assert _mapped_bytes_while_holding_buffer() == 0
    assert _mapped_bytes_while_holding_buffer() >= BUFFER_BYTES


def test_environment_turns_it_off(monkeypatch):
    monkeypatch.setenv("FADE_RETAIN_FREED_MEMORY", "0")
    with retain_freed_memory() as active:
        assert not active
        assert _mapped_bytes_while_holding_buffer() >= BUFFER_BYTES
