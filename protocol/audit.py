"""A privacy audit's record: the figures of a membership-inference audit (fednode.audit) as
the ledger keeps them (an ``audit`` event, protocol.events.Audit) and as an operator hands
them to the coordinator (admin ``audit.record``). ``check_record`` bounds every field where it
enters, as protocol.messages bounds a peer's figures.

Pure: no I/O.
"""

from __future__ import annotations

import math
from typing import Any

from protocol import text
from protocol.errors import ValidationError

#: The attacks an audit runs (fednode.audit), by the name their figures go under.
ATTACKS = ("shadow", "lira")
#: Each attack's figures, every one a fraction in [0, 1].
FIGURES = ("auc", "accuracy", "tpr_at_0_1pct_fpr", "tpr_at_1pct_fpr")
#: The record's other fractions and counts.
FRACTIONS = ("member_accuracy", "nonmember_accuracy", "fpr_floor")
COUNTS = ("members", "nonmembers", "shadow_models", "shadow_examples", "shadow_epochs")
MAX_COUNT = 10**9
TEXTS = ("model_cid", "members_data", "nonmembers_data")


def _fraction(name: str, value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValidationError(
            f"audit field {name!r} must be a number in [0, 1], got {text.shown(value)}",
            hint="send the figures fednode.audit computed (fedctl audit privacy does)",
        )
    return float(value)


def check_record(record: Any) -> dict[str, Any]:
    """The record as it is to be kept, or ValidationError naming the field."""
    if not isinstance(record, dict):
        raise ValidationError("the audit record must be a map")
    attacks = record.get("attacks")
    if not isinstance(attacks, dict) or set(attacks) != set(ATTACKS):
        raise ValidationError(
            f"audit field 'attacks' must hold exactly {', '.join(ATTACKS)}",
            hint="send the figures fednode.audit computed (fedctl audit privacy does)",
        )
    out: dict[str, Any] = {"attacks": {}}
    for attack in ATTACKS:
        figures = attacks[attack]
        if not isinstance(figures, dict):
            raise ValidationError(f"audit field 'attacks.{attack}' must be a map")
        out["attacks"][attack] = {
            f: _fraction(f"attacks.{attack}.{f}", figures.get(f)) for f in FIGURES
        }
    for name in FRACTIONS:
        out[name] = _fraction(name, record.get(name))
    for name in (*COUNTS, "seed"):
        value = record.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_COUNT:
            raise ValidationError(
                f"audit field {name!r} must be an integer in [0, {MAX_COUNT}], "
                f"got {text.shown(value)}"
            )
        out[name] = value
    for name in TEXTS:
        value = record.get(name, "")
        if not isinstance(value, str):
            raise ValidationError(f"audit field {name!r} must be text")
        out[name] = text.clean(value, text.MAX_TEXT)
    return out
