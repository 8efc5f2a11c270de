"""ASR evaluation: Whisper-style text normalisation, WER, and batched greedy decoding.

`decode` (which imports torch) is loaded lazily so that scoring alone stays cheap.
"""
from fade_kernels.eval.wer import compute_wer, get_normalizer, normalize, wer_report, word_error_counts

__all__ = ["compute_wer", "evaluate", "get_normalizer", "normalize", "transcribe", "wer_report", "word_error_counts"]


def __getattr__(name: str):
    if name in ("transcribe", "evaluate"):
        from fade_kernels.eval import decode

        return getattr(decode, name)
    raise AttributeError(name)
