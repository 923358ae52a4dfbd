"""The SCROLLS metrics in pure Python: ROUGE-1/2/L F1, SQuAD-style token F1 and exact match.

- ROUGE tokenisation: lowercase, runs of ``[a-z0-9]`` (no stemming, no stop words). ROUGE-N F1 from
  clipped n-gram counts, ROUGE-L F1 from the longest common subsequence.
- F1 / EM: SQuAD normalisation (lowercase, drop punctuation and the articles a/an/the, squeeze spaces).
- With several references the best score per example is kept, separately for each metric; example
  scores are averaged and reported ×100. The ROUGE tasks report the geometric mean of R-1, R-2, R-L.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def rouge_tokens(text: str) -> list[str]:
    return _ROUGE_TOKEN.findall(text.lower())


def _f1(overlap: int, predicted: int, reference: int) -> float:
    if overlap == 0 or predicted == 0 or reference == 0:
        return 0.0
    precision, recall = overlap / predicted, overlap / reference
    return 2 * precision * recall / (precision + recall)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def rouge_n(prediction: str, reference: str, n: int) -> float:
    """ROUGE-N F1 with clipped n-gram counts."""
    predicted, expected = _ngrams(rouge_tokens(prediction), n), _ngrams(rouge_tokens(reference), n)
    overlap = sum((predicted & expected).values())
    return _f1(overlap, sum(predicted.values()), sum(expected.values()))


def lcs_length(first: Sequence[str], second: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(len(first)·len(second)) time, O(len(second)) memory."""
    if len(second) > len(first):
        first, second = second, first
    previous = [0] * (len(second) + 1)
    for item in first:
        current = [0]
        for j, other in enumerate(second):
            current.append(previous[j] + 1 if item == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 from the longest common subsequence of the two token lists."""
    predicted, expected = rouge_tokens(prediction), rouge_tokens(reference)
    return _f1(lcs_length(predicted, expected), len(predicted), len(expected))


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    return _f1(overlap, len(predicted), len(expected))


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def best_over_references(metric: Callable[[str, str], float], prediction: str, references: Sequence[str]) -> float:
    if not references:
        raise ValueError("An example needs at least one reference.")
    return max(metric(prediction, reference) for reference in references)


METRIC_FUNCTIONS: dict[str, dict[str, Callable[[str, str], float]]] = {
    "rouge": {
        "rouge1": lambda p, r: rouge_n(p, r, 1),
        "rouge2": lambda p, r: rouge_n(p, r, 2),
        "rougeL": rouge_l,
    },
    "f1": {"f1": token_f1},
    "exact_match": {"exact_match": exact_match},
}


def score_examples(
    kind: str, predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Aggregate scores (×100, plus ``score``: the task's headline number) and per-example scores (0–1)."""
    if kind not in METRIC_FUNCTIONS:
        raise ValueError(f"Unknown metric {kind!r}; choose from {sorted(METRIC_FUNCTIONS)}.")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists.")
    if not predictions:
        raise ValueError("Nothing to score.")
    functions = METRIC_FUNCTIONS[kind]
    per_example = [
        {name: best_over_references(function, prediction, refs) for name, function in functions.items()}
        for prediction, refs in zip(predictions, references, strict=True)
    ]
    totals = {name: 100 * sum(scores[name] for scores in per_example) / len(per_example) for name in functions}
    if kind == "rouge":
        values = [totals[name] for name in functions]
        totals["score"] = math.prod(values) ** (1 / len(values))
    else:
        totals["score"] = next(iter(totals.values()))
    return totals, per_example
