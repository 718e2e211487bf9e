"""Noisy reports: what a participant says about its data, released with calibrated noise.

``[privacy] noisy_reports = true``. A participant's data report (fednode.quality.data_report,
sent with ``register``: ``rows``, ``missing``, ``duplicates``, ``label_counts``) is released
through the Laplace mechanism with ε = ``privacy.report_epsilon``:

* Neighbouring data sets differ by one record (added or removed). Such a record changes
  ``missing`` by at most 1 (it has a NaN or it has not), ``duplicates`` by at most 1 (rows
  minus distinct finite rows; a missing row is in neither) and one class's count by 1, and
  never both ``missing`` and ``duplicates``: the L1 sensitivity of (missing, duplicates,
  label_counts) together is REPORT_SENSITIVITY = 2. Every figure gets Laplace noise of scale
  b = 2 / ε, so the report as a whole is ε-DP (one release per registration).
* ``label_counts`` lists every class of the spec's model (``"0"`` .. ``"K-1"``, the class
  indices the schema maps labels to), zeros included: a key present only when a class occurs
  would tell which classes a participant holds whatever the noise. A regression task has no
  classes to count: its ``label_counts`` is released empty.
* ``rows`` is released as is: the registration's ``num_examples``, which weighting and the
  share caps need, already states it exactly (docs/privacy.md says what that leaves open).
* After the noise, post-processing (free under DP) makes the report valid for
  fednode.quality: each figure rounded to a whole number and clamped to [0, rows]; label
  counts that sum to more than rows are scaled down to fit.

Pure: numpy only. The noise comes from the OS's entropy unless a generator is passed (tests).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.messages import MAX_LABELS

#: L1 sensitivity of (missing, duplicates, label_counts) to adding or removing one record.
REPORT_SENSITIVITY = 2.0


@dataclass(frozen=True)
class ReportPrivacy:
    """How this participant releases its data report (from the spec it was started with)."""

    epsilon: float  # privacy.report_epsilon
    classes: int | None  # the model's classes (binary: 2); None for regression

    @property
    def scale(self) -> float:
        """b of the Laplace noise on each figure: sensitivity / ε."""
        return REPORT_SENSITIVITY / self.epsilon

    @classmethod
    def of_spec(cls, spec: Mapping[str, Any]) -> ReportPrivacy | None:
        """None unless the spec's privacy.noisy_reports is true."""
        p = spec.get("privacy", {})
        if not p.get("noisy_reports"):
            return None
        model = spec["model"]
        task = model.get("task", "classification")
        classes = None if task == "regression" else 2 if task == "binary" else model["classes"]
        return cls(float(p["report_epsilon"]), classes)


def _clamp_round(x: float, hi: int) -> int:
    return int(min(max(round(x), 0), hi))


def noisy_report(
    report: Mapping[str, Any], privacy: ReportPrivacy, rng: np.random.Generator | None = None
) -> dict[str, Any]:
    """``report`` (fednode.quality.data_report's shape) released under ``privacy``; ``{}``
    (not measured) stays ``{}``."""
    if not report:
        return {}
    rng = rng if rng is not None else np.random.default_rng()
    b = privacy.scale
    rows = int(report["rows"])
    out: dict[str, Any] = {
        "rows": rows,
        "missing": _clamp_round(report["missing"] + rng.laplace(0.0, b), rows),
        "duplicates": _clamp_round(report["duplicates"] + rng.laplace(0.0, b), rows),
    }
    if privacy.classes is None or privacy.classes > MAX_LABELS:
        out["label_counts"] = {}  # no fixed set of keys to release (see the module's doc)
        return out
    exact = report["label_counts"]
    keys = [str(k) for k in range(privacy.classes)]
    noisy = {k: _clamp_round(exact.get(k, 0) + rng.laplace(0.0, b), rows) for k in keys}
    total = sum(noisy.values())
    if total > rows:  # post-processing: fit the counts under rows, as the report must
        noisy = {k: math.floor(c * rows / total) for k, c in noisy.items()}
    out["label_counts"] = noisy
    return out
