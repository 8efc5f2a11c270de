"""Process-memory tools of the quantization pipeline.

cache: ActivationCache, the activation store kept in RAM up to a budget and memory-mapped from
files beyond it. mapped: handing the pages of memory-mapped weights back to the kernel. heap:
keeping freed buffers in the process during a run instead of returning them page by page.
"""
