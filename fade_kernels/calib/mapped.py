"""The mapped module moved to fade_kernels.memory.mapped; this name keeps old imports working."""
from fade_kernels.memory.mapped import c_library, file_mappings, release_file_pages  # noqa: F401
