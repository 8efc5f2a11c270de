"""The cache module moved to fade_kernels.memory.cache; this name keeps old imports working."""
from fade_kernels.memory.cache import parse_size, CachedTensor, load, materialize, ActivationCache  # noqa: F401
