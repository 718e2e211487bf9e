"""The participant's codec step (fednode.uplink): error feedback kept in the participant's
real SQLite ledger, so that a restart (the ledger closed and opened again by a new process'
Uplink) continues from the residual the last sent update left."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fednode import weights
from fednode.codecs import CodecParams, get_codec
from fednode.ledger import Ledger
from fednode.uplink import Uplink

TOPK = {"codec": "topk", "fraction": 0.25, "error_feedback": True}
BASE = {"w": np.zeros(4, np.float32)}


def _sent(data: bytes, fraction: float = 0.25) -> np.ndarray:
    return get_codec("topk").decode(data, {"w": (4,)}, CodecParams(fraction=fraction))["w"]


def test_the_residual_survives_a_restart_and_is_added_to_the_next_update(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    p = CodecParams(fraction=0.25)  # k = 1 of 4
    with Ledger(path) as led:
        up = Uplink(led)
        trained = {"w": np.array([0.5, -2.0, 0.25, 1.0], np.float32)}
        enc = up.encode("s1", 1, get_codec("topk"), p, TOPK, trained, BASE)
        assert np.array_equal(_sent(enc.data), [0, -2.0, 0, 0])  # the largest only
        assert enc.raw == 16  # 4 float32 values
        assert led.residual("s1") is None  # not until the update has left
        enc.commit()
    with Ledger(path) as led:  # a new process: nothing in memory, the ledger file only
        up = Uplink(led)
        saved = up.residual("s1", "topk", {"w": (4,)})
        assert saved is not None and np.array_equal(saved["w"], [0.5, 0, 0.25, 1.0])
        trained = {"w": np.array([0.1, 0.0, 0.0, -0.5], np.float32)}
        enc = up.encode("s1", 2, get_codec("topk"), p, TOPK, trained, BASE, saved)
        # 0.1 + 0.5 = 0.6 is now the largest of [0.6, 0, 0.25, 0.5]
        assert np.allclose(_sent(enc.data), [0.6, 0, 0, 0])
        enc.commit()
        row = led.residual("s1")
        assert row is not None and row["round"] == 2 and row["codec"] == "topk"
        assert np.allclose(weights.from_bytes(row["data"])["w"], [0, 0, 0.25, 0.5])


def test_an_update_that_never_left_keeps_the_previous_residual(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.db") as led:
        up = Uplink(led)
        p = CodecParams(fraction=0.25)
        trained = {"w": np.array([1.0, 2.0, 3.0, 4.0], np.float32)}
        up.encode("s1", 1, get_codec("topk"), p, TOPK, trained, BASE).commit()
        saved = up.residual("s1", "topk", {"w": (4,)})
        up.encode("s1", 2, get_codec("topk"), p, TOPK, trained, BASE, saved)  # a crash: no commit
        row = led.residual("s1")
        assert row is not None and row["round"] == 1
        # another codec's residual is not used (it would be added in the wrong units)
        assert up.residual("s1", "randk", {"w": (4,)}) is None
        # and a residual of other shapes is dropped, not misapplied
        assert up.residual("s1", "topk", {"w": (5,)}) is None


def test_without_error_feedback_nothing_is_kept(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.db") as led:
        up = Uplink(led)
        trained = {"w": np.array([1.0, 2.0, 3.0, 4.0], np.float32)}
        spec = {**TOPK, "error_feedback": False}
        enc = up.encode("s1", 1, get_codec("topk"), CodecParams(fraction=0.25), spec, trained, BASE)
        enc.commit()
        assert np.array_equal(_sent(enc.data), [0, 0, 0, 4.0]) and led.residual("s1") is None
        # identity sends the trained weights themselves, as before codecs existed
        ident = up.encode("s1", 1, get_codec("identity"), CodecParams(), {}, trained, BASE)
        assert ident.data == weights.to_bytes(trained)


def test_secure_randk_sends_the_shared_coordinates_and_keeps_the_rest(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.db") as led:
        up = Uplink(led)
        shapes = {"w": (4,)}
        spec = {"codec": "randk", "fraction": 0.5, "error_feedback": True}
        coords = np.array([1, 3])
        picked, commit = up.secure_select(
            "s1", 1, "randk", spec, np.array([1.0, 2.0, 3.0, 4.0]), coords, shapes
        )
        assert np.array_equal(picked, [2.0, 4.0])
        commit()
        picked, commit = up.secure_select(
            "s1", 2, "randk", spec, np.array([1.0, 1.0, 1.0, 1.0]), np.array([0, 2]), shapes
        )
        assert np.array_equal(picked, [2.0, 4.0])  # 1 + the residual 1, 1 + 3
        commit()
        row = led.residual("s1")
        assert row is not None
        assert np.array_equal(weights.from_bytes(row["data"])["w"], [0, 1.0, 0, 1.0])
