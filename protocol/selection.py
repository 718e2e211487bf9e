"""The words of spec [selection] that the spec (protocol.spec) and the round core
(fednode.rounds.sample) share: how a round picks its participants among the eligible ones.

Pure constants, no imports: the round core may import this without pulling in the spec's
own imports (tests/test_imports.py holds the core pure).
"""

from __future__ import annotations

#: selection.method: first (in the order peers came online), random (uniform, seeded),
#: quality (weighted by each peer's latest overall quality score)
METHODS = ("first", "random", "quality")

#: method = "quality": a peer's weight is its latest overall quality score (0-100), at least
#: QUALITY_FLOOR (a peer scored 0 can still be picked, and so show that it recovered), and
#: QUALITY_UNSCORED for a peer never scored (a newcomer stands in the middle).
QUALITY_FLOOR = 5.0
QUALITY_UNSCORED = 50.0
