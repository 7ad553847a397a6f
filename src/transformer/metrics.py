"""Scores: sacreBLEU's BLEU and chrF on detokenised text, exact match, and model loss / perplexity."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass
class Scores:
    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    sentences: int

    def as_dict(self) -> dict:
        return {
            "bleu": round(self.bleu, 2),
            "chrf": round(self.chrf, 2),
            "signature": {"bleu": self.bleu_signature, "chrf": self.chrf_signature},
            "sentences": self.sentences,
        }


def bleu_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> Scores:
    """Corpus BLEU (cased, 13a tokenisation: sacreBLEU's defaults) and chrF2 with their signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()
    hyps, refs = list(hypotheses), [list(references)]
    b, c = bleu.corpus_score(hyps, refs), chrf.corpus_score(hyps, refs)
    return Scores(b.score, c.score, str(bleu.get_signature()), str(chrf.get_signature()), len(hyps))


def bleu_score(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    from sacrebleu.metrics import BLEU

    return BLEU().corpus_score(list(hypotheses), [list(references)]).score


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of outputs identical to their reference."""
    if not references:
        return 0.0
    return sum(h == r for h, r in zip(hypotheses, references)) / len(references)


def accuracy(predicted: Sequence[int], gold: Sequence[int]) -> float:
    """Fraction of predicted classes equal to the gold ones."""
    return sum(p == g for p, g in zip(predicted, gold)) / max(len(gold), 1)


def macro_f1(predicted: Sequence[int], gold: Sequence[int], n_classes: int) -> float:
    """The unweighted mean over classes of F1 = 2 precision recall / (precision + recall) (0 for a class
    neither predicted nor present)."""
    scores = []
    for c in range(n_classes):
        tp = sum(p == c and g == c for p, g in zip(predicted, gold))
        fp = sum(p == c and g != c for p, g in zip(predicted, gold))
        fn = sum(p != c and g == c for p, g in zip(predicted, gold))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / max(n_classes, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
