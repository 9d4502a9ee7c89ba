"""Plain-word decisions for a reader: what each label's threshold means and why a label is (not) flagged."""

from __future__ import annotations

import math

LOW_PROBABILITY = 0.10  # a label flagged below this probability is flagged with the reason spelled out


def _pct(p: float) -> str:
    return f"{100 * p:.1f} %"


def decide(probability: float, threshold: float | None, validated: bool = True) -> dict:
    """``positive`` (True only at or above a finite threshold), a short ``decision`` and the ``reason`` in plain
    words. ``validated``: the threshold was picked on the run's validation part (else a default)."""
    if threshold is None or not math.isfinite(threshold):
        return {"positive": False, "decision": "probability only",
                "reason": "no threshold: this label was never positive in validation, shown as probability only"}
    where = "this label's validation threshold" if validated else "the default threshold (no validation data)"
    if probability >= threshold and probability < LOW_PROBABILITY:
        return {"positive": True, "decision": "flagged (low probability)",
                "reason": f"flagged because {_pct(probability)} is above {where} of {_pct(threshold)}; the "
                          "threshold is this low because the label is rare and the threshold maximises F1, so this "
                          "is a weak signal, not a confident finding"}
    if probability >= threshold:
        return {"positive": True, "decision": "positive",
                "reason": f"{_pct(probability)} is at or above {where} of {_pct(threshold)}"}
    return {"positive": False, "decision": "negative",
            "reason": f"{_pct(probability)} is below {where} of {_pct(threshold)}"}


__all__ = ["LOW_PROBABILITY", "decide"]
