"""Near-duplicate removal and a heuristic quality filter for generated (prompt, response) data.

A text is represented by its set of lowercased word n-grams ("shingles"); two texts are near duplicates when the
Jaccard similarity of their shingle sets is at least a threshold. Candidates are found with MinHash LSH
(datasketch) and then confirmed by the exact Jaccard similarity, so the result never contains a false positive.

Deviation from the usual definition: a text shorter than `ngram` words gets one shingle of all its words (instead of
none), so short texts can still be compared; two texts with no words at all count as duplicates (Jaccard 1.0).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from datasketch import MinHash, MinHashLSH

# LSH may miss a pair whose Jaccard similarity is exactly the threshold with at most this probability (less above it)
_MAX_MISS = 0.01


def _words(text: str) -> list[str]:
    # \w+ drops punctuation, so "Hello, world!" and "hello world" share their shingles
    return re.findall(r"\w+", text.lower())


def _ngrams(words: list[str], ngram: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)]


def shingles(text: str, ngram: int = 3) -> set[tuple[str, ...]]:
    """The set of lowercased word n-grams of `text`, punctuation stripped.

    A text with fewer than `ngram` (but at least one) words gives one shingle of all its words; a text with no
    words gives the empty set.
    """
    words = _words(text)
    if not words:
        return set()
    if len(words) < ngram:
        return {tuple(words)}
    return set(_ngrams(words, ngram))


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets count as identical (1.0)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) for MinHashLSH such that a pair at `threshold` is missed with probability <= _MAX_MISS.

    datasketch's own choice balances false positives against false negatives and misses ~60% of pairs at 0.8; here
    false positives are free (the exact check removes them), so take the most rows per band (fewest spurious
    candidates) that keeps misses rare. A pair collides in a band with probability J^r, so it is missed with
    probability (1 - J^r)^b.
    """
    for rows in range(num_perm // 2, 0, -1):
        bands = num_perm // rows
        if (1 - threshold**rows) ** bands <= _MAX_MISS:
            return bands, rows
    return num_perm, 1  # the most sensitive banding; too few permutations to reach _MAX_MISS


def near_duplicates(
    texts: Sequence[str], threshold: float = 0.8, ngram: int = 3, num_perm: int = 128, seed: int = 1
) -> list[int | None]:
    """For each text, the index of the earliest EARLIER text it near-duplicates, else None.

    Text j near-duplicates an earlier text i when jaccard(shingles(i), shingles(j)) >= `threshold`. Keeping the
    rows whose entry is None removes near duplicates while keeping the first of each group.

    MinHash LSH finds candidate pairs in roughly linear time instead of comparing all pairs, but it is approximate:
    each candidate is confirmed by the exact Jaccard similarity, which removes LSH's false positives. LSH can still
    miss a pair whose similarity is just above `threshold` (a false negative): the banding is chosen so that this
    happens with probability at most 1% at the threshold, falling quickly above it (with num_perm >= ~64).

    Returns a list of len(texts).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    shingle_sets = [shingles(text, ngram) for text in texts]
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=_bands(threshold, num_perm))
    result: list[int | None] = []
    for index, shingle_set in enumerate(shingle_sets):
        minhash = MinHash(num_perm=num_perm, seed=seed)
        minhash.update_batch([" ".join(shingle).encode() for shingle in shingle_set])
        # querying before inserting means only earlier texts can match
        confirmed = [
            candidate for candidate in lsh.query(minhash) if jaccard(shingle_sets[candidate], shingle_set) >= threshold
        ]
        result.append(min(confirmed) if confirmed else None)
        lsh.insert(index, minhash)
    return result


def quality_problem(
    prompt: str,
    response: str,
    *,
    min_words: int = 1,
    max_words: int = 512,
    max_repeated_ngram_share: float = 0.5,
    min_letter_share: float = 0.5,
    ngram: int = 3,
) -> str | None:
    """Why a (prompt, response) pair is low quality, or None when it passes every check.

    Checks, in order (the first failure is reported, with the measured value and the limit):
    empty response; word count (`response.split()`) outside [min_words, max_words]; share of repeated word n-grams
    (1 - distinct / total, over lowercased words, when there are at least 2 n-grams) above
    `max_repeated_ngram_share`; the response copies the prompt; share of letters among non-space characters below
    `min_letter_share`.
    """
    if not response.strip():
        return "empty response"
    word_count = len(response.split())
    if word_count < min_words:
        return f"too short: {word_count} words < min_words {min_words}"
    if word_count > max_words:
        return f"too long: {word_count} words > max_words {max_words}"
    grams = _ngrams(response.lower().split(), ngram)
    if len(grams) >= 2:
        repeated_share = 1 - len(set(grams)) / len(grams)
        if repeated_share > max_repeated_ngram_share:
            return (
                f"repeats itself: {repeated_share:.2f} of {ngram}-grams are repeats "
                f"> max_repeated_ngram_share {max_repeated_ngram_share}"
            )
    if _copies(prompt, response):
        return "copies the prompt"
    non_space = [char for char in response if not char.isspace()]
    letter_share = sum(char.isalpha() for char in non_space) / len(non_space)
    if letter_share < min_letter_share:
        return f"mostly not letters: letter share {letter_share:.2f} < min_letter_share {min_letter_share}"
    return None


def _copies(prompt: str, response: str) -> bool:
    if response.strip().lower() == prompt.strip().lower():
        return True
    prompt_words = prompt.lower().split()
    # a short prompt ("Why?") is legitimately repeated inside answers, so containment only counts for 5+ words
    return len(prompt_words) >= 5 and " ".join(prompt_words) in " ".join(response.lower().split())
