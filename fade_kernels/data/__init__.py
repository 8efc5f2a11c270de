"""Speech data: audio loading, corpora/manifests and synthetic dev-set generation.

`synth` is not imported here because it pulls in piper/onnxruntime lazily only when used.
"""
from fade_kernels.data.audio import TARGET_SR, load_audio, resample
from fade_kernels.data.corpus import (
    Utterance,
    load_corpus,
    read_librispeech,
    read_manifest,
    select_subset,
    write_manifest,
)

__all__ = [
    "TARGET_SR",
    "Utterance",
    "load_audio",
    "load_corpus",
    "read_librispeech",
    "read_manifest",
    "resample",
    "select_subset",
    "write_manifest",
]
