"""A participant's attacks (`fednode run --attack KIND`, fednode.attacks): what each makes of
an update, by hand on tiny weights; the parser's refusals; the participant sending it (in
process, a fake connection); and `fedctl demo --attackers` end to end, where the
coordinator's own figures show the attacker's update is the one the attack makes.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import fedctl.cli
import fednode.cli
from fedctl.render import summary_lines
from fednode import attacks, bounds, training, weights
from fednode import participant as P
from fednode.attacks import Attack, flip_labels, parse
from fednode.data import Dataset, parse_dataset_spec
from fednode.home import NodeHome
from fednode.ledger import Ledger
from fednode.session import model_spec
from fednode.store import BlockStore
from protocol import messages, spec
from protocol.errors import UsageError
from protocol.identity import Identity
from tests.conftest import cli_json
from tests.test_participant_limits import COORD, SESSION, FakeConn, make_spec, round_start

G = {"a": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "b": np.array([0.5], np.float32)}
D = {"a": np.array([[0.5, -1.0], [0.0, 2.0]], np.float32), "b": np.array([-0.25], np.float32)}
W = {k: G[k] + D[k] for k in G}  # the trained weights: the update w - g is D


# --- the transforms, by hand -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "a", "b"),
    [
        ("sign_flip", [[0.5, 3.0], [3.0, 2.0]], [0.75]),  # g - d
        ("scale:3", [[2.5, -1.0], [3.0, 10.0]], [-0.25]),  # g + 3d
        ("scale:-1", [[0.5, 3.0], [3.0, 2.0]], [0.75]),  # sign_flip's twin
        ("constant:0.25", [[1.25, 2.25], [3.25, 4.25]], [0.75]),  # g + V
        ("constant:-2", [[-1.0, 0.0], [1.0, 2.0]], [-1.5]),
        ("free_rider", [[1.0, 2.0], [3.0, 4.0]], [0.5]),  # g itself
        ("label_flip", [[1.5, 1.0], [3.0, 6.0]], [0.25]),  # w: the attack was on the data
    ],
)
def test_each_attack_makes_the_update_it_says(kind: str, a: Any, b: Any) -> None:
    sent = parse(kind).update(W, G)
    assert sent.keys() == G.keys()
    np.testing.assert_array_equal(sent["a"], np.array(a, np.float32))
    np.testing.assert_array_equal(sent["b"], np.array(b, np.float32))
    assert all(v.dtype == np.float32 for v in sent.values())


def test_sign_flip_keeps_an_honest_norm() -> None:
    sent = parse("sign_flip").update(W, G)
    assert bounds.update_norm(sent, G) == pytest.approx(bounds.update_norm(W, G))
    assert bounds.update_norm(parse("free_rider").update(W, G), G) == 0.0


def test_gaussian_ignores_training_and_draws_from_its_generator() -> None:
    sent = parse("gaussian:0.5").update(W, G, np.random.default_rng(7))
    noise = np.random.default_rng(7)
    for k in G:  # g plus exactly the generator's draws, in the order of the tensors
        want = G[k].astype(np.float64) + noise.normal(0.0, 0.5, size=G[k].shape)
        np.testing.assert_array_equal(sent[k], want.astype(np.float32))
    # the node's own entropy: two attackers (or two rounds) never send the same noise
    one, two = (parse("gaussian:0.5").update(W, G) for _ in range(2))
    assert not np.array_equal(one["a"], two["a"])
    big = {"x": np.zeros(20_000, np.float32)}
    drawn = parse("gaussian:2").update(big, big)["x"]
    assert drawn.std() == pytest.approx(2.0, rel=0.05) and abs(drawn.mean()) < 0.1


# --- label_flip --------------------------------------------------------------------------


def _model(task: str, classes: int = 4) -> dict[str, Any]:
    m = {"kind": "logreg", "inputs": 2, "task": task}
    m["classes"] = classes if task == "classification" else 1  # one output otherwise
    return model_spec(make_spec(**m))


def test_flip_labels_for_each_task() -> None:
    y = np.array([0, 1, 3, 2], np.int64)
    flipped = flip_labels(y, _model("classification"))
    np.testing.assert_array_equal(flipped, [3, 2, 0, 1])  # C-1-y with C = 4
    assert flipped.dtype == np.int64
    np.testing.assert_array_equal(flip_labels(np.array([0, 1, 1]), _model("binary")), [1, 0, 0])
    r = np.array([1.5, -2.0, 0.0], np.float32)
    np.testing.assert_array_equal(flip_labels(r, _model("regression")), [-1.5, 2.0, 0.0])


def test_label_flip_trains_on_flipped_labels() -> None:
    """A tiny separable set: trained on the flipped labels, the model predicts them."""
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]] * 8, np.float32)
    y = (x[:, 0] + 2 * x[:, 1]).astype(np.int64)  # four classes, one per corner
    data = Dataset(x, y)
    mspec = _model("classification")
    flipped = parse("label_flip").training_data(data, mspec)
    np.testing.assert_array_equal(flipped.y, 3 - y)
    np.testing.assert_array_equal(data.y, y)  # the participant's own data is untouched
    assert parse("sign_flip").training_data(data, mspec) is data
    cfg = training.TrainConfig(local_epochs=60, batch_size=32, lr=1.0, optimizer="sgd", momentum=0)
    w = training.train(mspec, training.init_weights(mspec, 0), flipped, cfg).weights
    assert training.evaluate_metrics(mspec, w, Dataset(x, 3 - y))["accuracy"] == 1.0
    assert training.evaluate_metrics(mspec, w, data)["accuracy"] == 0.0


# --- the parser --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("sign_flip", Attack("sign_flip")),
        ("scale:-4", Attack("scale", -4.0)),
        ("gaussian:0.01", Attack("gaussian", 0.01)),
        ("label_flip", Attack("label_flip")),
        ("constant:1e3", Attack("constant", 1000.0)),
        (" free_rider ", Attack("free_rider")),
    ],
)
def test_parse(text: str, want: Attack) -> None:
    got = parse(text)
    assert got == want and parse(str(got)) == got


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("flip", "'flip' is not an attack"),
        ("", "'' is not an attack"),
        ("scale", "scale needs its argument: scale:F"),
        ("scale:", "scale needs its argument"),
        ("scale:big", "F = 'big' is not a number"),
        ("scale:inf", "out of range (-10000 <= F <= 10000)"),
        ("scale:nan", "out of range"),
        ("scale:10001", "out of range"),
        ("gaussian:0", "out of range (0 < SIGMA <= 10000)"),
        ("gaussian:-1", "out of range"),
        ("constant:-1e5", "out of range (-10000 <= V <= 10000)"),
        ("sign_flip:2", "sign_flip takes no argument"),
        ("free_rider:", "free_rider takes no argument"),
    ],
)
def test_a_bad_kind_is_a_usage_error_naming_the_option(text: str, says: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse(text)
    assert exc.value.code == "USAGE"
    assert exc.value.message.startswith(f"--attack {text!r}: ") and says in exc.value.message
    for form in ("sign_flip", "scale:F", "gaussian:SIGMA", "label_flip", "constant:V"):
        assert form in exc.value.hint
    assert "free_rider" in exc.value.hint


def test_fednode_run_refuses_an_attacking_coordinator(tmp_path: Path) -> None:
    home = tmp_path / "node"
    NodeHome(home).init()
    runner = CliRunner()
    args = ["run", "--data-dir", str(home), "--attack"]
    res = runner.invoke(fednode.cli.app, [*args, "sign_flip", "--role", "coordinator"])
    assert res.exit_code == 2 and "--attack 'sign_flip' is for a participant" in res.output
    res = runner.invoke(fednode.cli.app, [*args, "scale:1e9", "--role", "participant"])
    assert res.exit_code == 2 and "out of range" in res.output


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--attackers", "3", "--attack", "sign_flip"], "leaves no honest participant of 3"),
        (["--attackers", "1"], "needs --attack KIND"),
        (["--attack", "sign_flip"], "needs --attackers N"),
        (["--attackers", "1", "--attack", "flip"], "'flip' is not an attack"),
        (["--attackers", "1", "--attack", "sign_flip", "--strategy", "nope"], "nope"),
    ],
)
def test_demo_refuses_before_starting_anything(tmp_path: Path, extra: list[str], says: str) -> None:
    work = tmp_path / "demo"
    argv = ["--key", str(tmp_path / "op.key"), "demo", "--participants", "3", "--json"]
    res = CliRunner().invoke(fedctl.cli.app, [*argv, "--workdir", str(work), *extra])
    assert res.exit_code == 2, res.output
    assert says in json.loads(res.output)["error"]["message"]
    assert not work.exists()  # nothing was started or written


def test_the_summary_names_the_attackers() -> None:
    s = {
        "session_id": "s-1",
        "status": "completed",
        "rounds_completed": 2,
        "participants": 3,
        "strategy": "fedavg",
        "secure_aggregation": False,
        "history": [],
        "final_accuracy": 0.9,
        "final_loss": 0.3,
        "dropped": 0,
        "duration_s": 1.0,
        "bytes_up": 1,
        "bytes_down": 1,
        "model_cid": "bafy",
        "ledger": "/x",
    }
    text = [str(getattr(r, "plain", "")) for r in summary_lines(s)]
    assert not any("attackers" in t for t in text)
    shown = summary_lines({**s, "attack": "scale:-4", "attackers": ["12D3KooWa", "12D3KooWb"]})
    assert shown[-2].plain == "attackers (scale:-4) 12D3KooWa, 12D3KooWb"
    assert shown[-1].plain == "quarantined by the coordinator 0 of 2 attackers"
    found = {"quarantined": ["12D3KooWa", "12D3KooWc"]}  # one caught, one honest peer wrongly
    shown = summary_lines(
        {**s, "attack": "sign_flip", "attackers": ["12D3KooWa", "12D3KooWb"]} | found
    )
    assert shown[-1].plain == (
        "quarantined by the coordinator 1 of 2 attackers, and 1 honest participants"
    )


# --- in a participant, without sockets ---------------------------------------------------


def _node(tmp_path: Path, ident: Identity, attack: Attack | None) -> P.Participant:
    root = tmp_path / (str(attack) if attack else "honest")
    node = P.Participant(
        ident,
        Ledger(root / "ledger.db"),
        BlockStore(root / "store"),
        url="ws://127.0.0.1:1",
        coordinator_id=COORD.peer_id,
        dataset=parse_dataset_spec("digits:0/3"),
        limits=P.Limits(max_params=100_000, max_memory=2**30, max_train_s=600.0),
        attack=attack,
    )
    node.num_examples = 479
    return node


async def _sent(node: P.Participant, s: dict[str, Any]) -> tuple[messages.Update, weights.Weights]:
    """The update ``node`` sends for round 1 of ``s``, and the round's global model."""
    conn = FakeConn(node)
    task = round_start(node, s)
    await node._do_round(conn, SESSION, task)
    (msg,) = conn.sent
    assert isinstance(msg, messages.Update), msg
    return msg, weights.from_bytes(node.store.get(task.model_cid))


def _events(node: P.Participant, kind: str) -> list[dict[str, Any]]:
    rows = sqlite3.connect(node.ledger.path).execute(
        "SELECT data FROM events WHERE kind = ?", (kind,)
    )
    return [json.loads(d) for (d,) in rows]


async def test_an_attacker_sends_what_its_attack_makes_and_says_so_only_to_itself(
    tmp_path: Path,
) -> None:
    s = spec.validate(
        {
            "min_participants": 1,
            "model": {"hidden": [16]},
            "training": {"local_epochs": 1},
            "evaluation": {"on": "both"},  # each participant reports on its held-out split
        }
    )
    ident = Identity.generate()  # the same peer ID: the same minibatch order, the same training
    honest, g = await _sent(_node(tmp_path, ident, None), s)
    w = weights.from_bytes(honest.data)
    for kind in ("sign_flip", "free_rider", "label_flip"):
        node = _node(tmp_path, ident, parse(kind))
        msg, _ = await _sent(node, s)
        sent = weights.from_bytes(msg.data)
        # like an honest participant in everything but the model: count, report, loss
        assert msg.num_examples == honest.num_examples == 479
        assert msg.eval_loss == honest.eval_loss and msg.eval_metrics == honest.eval_metrics
        (ev,) = [e for e in _events(node, "attack") if e.get("round") == 1]
        assert ev["attack"] == kind
        assert ev["sent_norm"] == pytest.approx(bounds.update_norm(sent, g))
        if kind == "sign_flip":
            for k in g:
                np.testing.assert_allclose(sent[k], 2 * g[k] - w[k], atol=1e-6)
            assert ev["honest_norm"] == pytest.approx(bounds.update_norm(w, g))
        elif kind == "free_rider":
            assert all(np.array_equal(sent[k], g[k]) for k in g)
            assert msg.loss == honest.loss  # it trained, and reports the loss it had
        else:  # label_flip: trained on C-1-y, so it fits the flipped labels, not the true ones
            assert any(not np.array_equal(sent[k], w[k]) for k in w)
            train, _test = node._local_data(s)
            mspec = model_spec(s)
            true = training.evaluate_metrics(mspec, sent, train)["accuracy"]
            flipped = training.evaluate_metrics(mspec, sent, Dataset(train.x, 9 - train.y))
            assert flipped["accuracy"] > 0.4 and true < 0.1, (flipped, true)
        node.ledger.close()


def test_the_announcement_is_in_the_nodes_own_ledger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Ledger(tmp_path / "ledger.db") as ledger:
        attacks.announce(parse("scale:-4"), ledger)
        (row,) = ledger.db.execute("SELECT kind, data FROM events").fetchall()
    assert row[0] == "attack"
    assert json.loads(row[1]) == {
        "attack": "scale:-4",
        "what": "sends the update times (-4): g + (-4)*(w - g)",
    }
    assert "this node is an ATTACKER: --attack scale:-4" in caplog.text


# --- end to end: fedctl demo --attackers -------------------------------------------------


@pytest.mark.slow  # 8 s; an attacker process: test_robustness_e2e; the demo options: above
def test_demo_with_a_sign_flip_attacker(tmp_path: Path) -> None:
    """Three participant processes, the last one attacking; the coordinator's ledger is
    never told, but its own figures show the attacker's update is the honest one negated."""
    work = tmp_path / "demo"
    s = cli_json(
        "--key",
        str(tmp_path / "op.key"),
        "demo",
        "--participants",
        "3",
        "--rounds",
        "2",
        "--attackers",
        "1",
        "--attack",
        "sign_flip",
        "--strategy",
        "fedavg",
        "--workdir",
        str(work),
        timeout=120,
    )
    attacker = NodeHome(work / "participant-2").identity().peer_id
    assert s["ok"] and s["status"] == "completed" and s["rounds_completed"] == 2
    assert s["attack"] == "sign_flip" and s["attackers"] == [attacker]
    assert s["quarantined"] == []  # three updates a round: too few to judge (min_updates 4)

    coord = sqlite3.connect(work / "coordinator" / "ledger.db")
    told = coord.execute(
        "SELECT count(*) FROM events WHERE kind = 'attack' OR data LIKE '%sign_flip%'"
    ).fetchone()[0]
    assert told == 0  # the coordinator is told nothing
    own = {
        e["round"]: e
        for e in (
            json.loads(d)
            for (d,) in sqlite3.connect(work / "participant-2" / "ledger.db").execute(
                "SELECT data FROM events WHERE kind = 'attack'"
            )
        )
        if "round" in e
    }
    store = BlockStore(work / "coordinator" / "store")
    # every norm the coordinator measured for it (outlier detection may leave an excluded
    # update out of a round's aggregation event) is the one it sent: an honest norm
    for (data,) in coord.execute("SELECT data FROM events WHERE kind = 'aggregation'"):
        agg = json.loads(data)
        if attacker in agg["updates"]:
            norm = agg["updates"][attacker]["norm"]
            assert norm == pytest.approx(own[agg["round"]]["sent_norm"], rel=1e-9)
    rounds = coord.execute("SELECT round, model_cid_in FROM training_rounds ORDER BY round")
    for r, base in rounds:
        # the updates as the coordinator received them (its audit copies), as steps from g
        g = _vector(store, base)
        steps = {
            peer: _vector(store, cid) - g
            for peer, cid in coord.execute(
                "SELECT participant, update_cid FROM client_updates WHERE round = ?", (r,)
            )
        }
        assert len(steps) == 3
        norm = float(np.linalg.norm(steps[attacker]))
        assert norm == pytest.approx(own[r]["sent_norm"], rel=1e-5)
        assert norm == pytest.approx(own[r]["honest_norm"], rel=1e-5)
        # and its direction is against the honest participants' (IID digits: they agree)
        honest = sum(v for p, v in steps.items() if p != attacker)
        cos = float(steps[attacker] @ honest) / (norm * float(np.linalg.norm(honest)))
        assert cos < -0.5, cos
    assert sorted(own) == [1, 2]


def _vector(store: BlockStore, cid: str) -> np.ndarray:
    """A model in the coordinator's store as one float64 vector (tensors by name)."""
    w = weights.from_bytes(store.get(cid))
    return np.concatenate([w[k].astype(np.float64).ravel() for k in sorted(w)])
