"""The heap module moved to fade_kernels.memory.heap; this name keeps old imports working."""
from fade_kernels.memory.heap import MallInfo2, mallinfo2, retention_requested, retain_freed_memory  # noqa: F401
