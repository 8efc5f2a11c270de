"""Word error rate with Whisper's English text normaliser.

References and hypotheses are normalised the same way before scoring (lower case, punctuation
stripped, spelled-out numbers -> digits, "Mr." -> "mister", British -> American spelling if a
spelling map is given), so that WER measures recognition errors, not formatting.
"""
from __future__ import annotations

from collections import defaultdict
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence


@lru_cache(maxsize=1)
def _default_normalizer() -> Callable[[str], str]:
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    # The bundled tiny.en ships no normalizer.json, so no British->American spelling map.
    return EnglishTextNormalizer({})


def get_normalizer(tokenizer_or_map: Any = None) -> Callable[[str], str]:
    """Return a callable str -> str applying Whisper's EnglishTextNormalizer.

    tokenizer_or_map: None (empty spelling map); a dict spelling map (normalizer.json
    contents); or a Whisper tokenizer/processor, whose `english_spelling_normalizer`
    (loaded from normalizer.json when the checkpoint has one) is used if present.
    """
    if tokenizer_or_map is None:
        return _default_normalizer()
    if isinstance(tokenizer_or_map, Mapping):
        mapping = dict(tokenizer_or_map)
    else:
        tok = getattr(tokenizer_or_map, "tokenizer", tokenizer_or_map)
        mapping = getattr(tok, "english_spelling_normalizer", None)
        if not mapping:
            return _default_normalizer()
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer(mapping)


def normalize(text: str | None, normalizer: Callable[[str], str] | None = None) -> str:
    """Normalised text with single spaces (None -> "").

    Tokens without a letter or digit are dropped: the normaliser keeps a "." (for decimals), so
    "..." would otherwise count as a one-word reference; punctuation-only text normalises to ""
    and follows the empty-reference rule of word_error_counts."""
    if not text:
        return ""
    norm = normalizer or _default_normalizer()
    return " ".join(word for word in norm(text).split() if any(ch.isalnum() for ch in word))


def word_error_counts(
    references: Sequence[str | None],
    hypotheses: Sequence[str],
    normalizer: Callable[[str], str] | None = None,
) -> dict[str, int]:
    """Aligned edit counts summed over all pairs, after normalisation.

    Returns {"substitutions", "deletions", "insertions", "hits", "ref_words", "n"}.
    A pair whose normalised reference is empty (jiwer refuses those) contributes its
    hypothesis words as insertions, so hallucinated text on silence is still penalised.
    """
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [normalize(r, normalizer) for r in references]
    hyps = [normalize(h, normalizer) for h in hypotheses]
    out = {"substitutions": 0, "deletions": 0, "insertions": 0, "hits": 0, "ref_words": 0, "n": len(refs)}
    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    out["insertions"] += sum(len(h.split()) for r, h in zip(refs, hyps) if not r)
    if pairs:
        o = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
        out["substitutions"] += o.substitutions
        out["deletions"] += o.deletions
        out["insertions"] += o.insertions
        out["hits"] += o.hits
        out["ref_words"] += sum(len(r.split()) for r, _ in pairs)
    return out


def _wer_from_counts(c: Mapping[str, int]) -> float:
    errors = c["substitutions"] + c["deletions"] + c["insertions"]
    if c["ref_words"] == 0:
        # No reference words at all: perfect if nothing was hypothesised, else 100 % (a finite
        # cap rather than inf/NaN, so reports stay JSON-serialisable and comparable).
        return 0.0 if errors == 0 else 1.0
    return errors / c["ref_words"]


def compute_wer(
    references: Sequence[str | None],
    hypotheses: Sequence[str],
    normalizer: Callable[[str], str] | None = None,
) -> float:
    """Corpus WER = (S + D + I) / reference words, over all pairs after normalisation.

    This is the usual pooled WER (not the mean of per-utterance WERs). It can exceed 1.0.
    """
    return _wer_from_counts(word_error_counts(references, hypotheses, normalizer))


def wer_report(
    utterances: Sequence[Any],
    hypotheses: Sequence[str],
    normalizer: Callable[[str], str] | None = None,
) -> dict:
    """Overall and per-subset WER.

    utterances: objects with `.text` (str | None) and `.subset` (e.g. corpus.Utterance), or
    dicts with those keys; hypotheses: one string per utterance, same order. Unlabelled
    utterances (text None) are left out of the scores and counted in `n_unlabelled`.
    Returns {"wer", "n_scored", "n_unlabelled", "ref_words", "substitutions", "deletions",
    "insertions", "subsets": {name: {"wer", "n_scored", "ref_words", ...}}}.
    """
    if len(utterances) != len(hypotheses):
        raise ValueError(f"{len(utterances)} utterances but {len(hypotheses)} hypotheses")

    def field(u: Any, name: str, default: Any = None) -> Any:
        return u.get(name, default) if isinstance(u, Mapping) else getattr(u, name, default)

    groups: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    refs, hyps, n_unlabelled = [], [], 0
    for u, h in zip(utterances, hypotheses):
        text = field(u, "text")
        if text is None:
            n_unlabelled += 1
            continue
        refs.append(text)
        hyps.append(h or "")
        g = groups[str(field(u, "subset", "default") or "default")]
        g[0].append(text)
        g[1].append(h or "")

    def block(r: list, h: list) -> dict:
        c = word_error_counts(r, h, normalizer)
        return {
            "wer": _wer_from_counts(c),
            "n_scored": c["n"],
            "ref_words": c["ref_words"],
            "substitutions": c["substitutions"],
            "deletions": c["deletions"],
            "insertions": c["insertions"],
        }

    report = block(refs, hyps)
    report["n_unlabelled"] = n_unlabelled
    report["subsets"] = {name: block(*groups[name]) for name in sorted(groups)}
    return report
