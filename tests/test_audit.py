"""The membership-inference audit (fednode.audit; docs/privacy.md "Auditing").

In process: the attack has power on a deliberately overfit model (a wide MLP trained for
many epochs on 200 digits) and none worth the name on an ε = 3 DP-SGD model. The DP model
is trained here with Opacus's PrivacyEngine directly (make_private_with_epsilon), so this
test does not depend on the local_dp mechanism's wiring. The record's bounds, the task
check, and one end-to-end run of `fedctl audit privacy` on a real cluster.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import fedctl.cli as cli_mod
from fedctl import output
from fedctl.report import render_text
from fednode import audit, training, weights
from fednode.data import Dataset, apply_features, digits_split
from protocol import modelspec
from protocol import spec as specmod
from protocol.audit import check_record
from protocol.cid import file_cid
from protocol.errors import Unsupported, ValidationError
from protocol.operations import Op
from tests.conftest import cli, cli_json, start_cluster
from tests.test_hostile_text import SGR
from tests.test_quality_e2e import create, future_ids, spec_file, start_and_watch


def _digits(n_members: int) -> tuple[Dataset, Dataset]:
    """n_members digits as members, every other digit (train and test split) as the rest."""
    x_train, y_train, x_test, y_test = digits_split(0)
    x_train, x_test = apply_features(x_train, x_test, "standardize")
    assert x_test is not None
    x, y = np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])
    perm = np.random.default_rng(0).permutation(len(y))
    return (
        Dataset(x[perm[:n_members]], y[perm[:n_members]]),
        Dataset(x[perm[n_members:]], y[perm[n_members:]]),
    )


def _spec(hidden: list[int], epochs: int, lr: float) -> dict[str, Any]:
    return specmod.validate(
        {
            "name": "audit",
            "rounds": 1,
            "model": {"kind": "mlp", "inputs": 64, "hidden": hidden, "classes": 10},
            "training": {"local_epochs": epochs, "lr": lr},
        }
    )


def test_the_attacks_find_members_of_an_overfit_model() -> None:
    members, rest = _digits(200)
    spec = _spec([256, 256], 100, 0.05)
    cfg = audit.shadow_config(spec)
    final = training.train(spec["model"], training.init_weights(spec["model"], 0), members, cfg)
    evaluated, outside, pool = audit.audit_sets(
        members, Dataset(rest.x[:600], rest.y[:600]), seed=0
    )
    result = audit.audit(spec["model"], final.weights, evaluated, outside, pool, cfg, shadows=4)
    assert result.member_accuracy == 1.0  # memorised
    for name in audit.ATTACKS:
        assert result.attacks[name].auc >= 0.6, result
        assert 0.5 < result.attacks[name].accuracy <= 1.0
    assert result.members == result.nonmembers == 200 and result.fpr_floor == 1 / 200
    assert check_record(result.to_dict())["attacks"]["lira"]["auc"] == result.attacks["lira"].auc


def _dp_train(spec: dict[str, Any], data: Dataset, epsilon: float, epochs: int) -> Any:
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = training.sequential(modelspec.model_layers(spec["model"]))
    training.set_weights(model, training.init_weights(spec["model"], 0))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y)),
        batch_size=64,
        shuffle=True,
    )
    engine = PrivacyEngine(accountant="rdp")
    private, opt, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=loader,
        target_epsilon=epsilon,
        target_delta=1e-5,
        epochs=epochs,
        max_grad_norm=1.0,
    )
    loss = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        for xb, yb in loader:
            if len(yb):  # Poisson sampling may draw an empty batch
                opt.zero_grad()
                loss(private(xb), yb).backward()
                opt.step()
    assert engine.get_epsilon(1e-5) <= epsilon
    return training.get_weights(model)


def test_an_epsilon_3_model_leaks_little() -> None:
    members, rest = _digits(900)
    spec = _spec([64], 15, 0.5)
    weights = _dp_train(spec, members, 3.0, 15)
    evaluated, outside, pool = audit.audit_sets(members, rest, seed=0)
    result = audit.audit(
        spec["model"], weights, evaluated, outside, pool, audit.shadow_config(spec), shadows=4
    )
    assert result.nonmember_accuracy > 0.6  # a model that learned, not noise
    for name in audit.ATTACKS:
        assert result.attacks[name].auc <= 0.55, result


def test_a_model_that_is_not_classification_is_refused() -> None:
    spec = _spec([8], 1, 0.05)
    model = {**spec["model"], "task": "regression", "classes": 1}
    with pytest.raises(Unsupported, match=r"model\.task = 'regression'"):
        audit.check_model(model)


def test_the_record_is_bounded_where_it_enters() -> None:
    good: dict[str, Any] = {
        "attacks": {
            a: {"auc": 0.5, "accuracy": 0.5, "tpr_at_0_1pct_fpr": 0.0, "tpr_at_1pct_fpr": 0.01}
            for a in ("shadow", "lira")
        },
        **dict.fromkeys(("member_accuracy", "nonmember_accuracy", "fpr_floor"), 0.5),
        **dict.fromkeys(("members", "nonmembers", "shadow_models", "shadow_examples"), 10),
        "shadow_epochs": 2,
        "seed": 0,
        "model_cid": "bafy",
    }
    assert check_record(good)["attacks"]["shadow"]["auc"] == 0.5
    for path, value in (
        (("attacks", "lira", "auc"), 1.5),
        (("attacks", "shadow", "accuracy"), float("nan")),
        (("members",), -1),
        (("fpr_floor",), True),
    ):
        bad = copy.deepcopy(good)
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(ValidationError, match=path[-1]):
            check_record(bad)
    with pytest.raises(ValidationError, match="attacks"):
        check_record({**good, "attacks": {"shadow": good["attacks"]["shadow"]}})


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """fedctl's consoles writing to one buffer, wide enough for a table on one line each."""
    buf = io.StringIO()
    for console in (output.stdout, output.stderr):
        monkeypatch.setattr(console, "_file", buf)
        monkeypatch.setattr(console, "_width", 200)
    return buf


@pytest.fixture
def coordinator(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """fedctl's admin calls answered in process, for a digits session of 3 shards whose model
    is its initial one; what `audit.record` receives is kept under "recorded"."""
    spec = specmod.validate({"name": "fake", "rounds": 1})
    model = weights.to_bytes(training.init_weights(spec["model"], 0))
    state: dict[str, Any] = {
        "inputs": {
            "session_id": "s1",
            "status": "completed",
            "spec": spec,
            "model_cid": file_cid(model),
            "datasets": {f"peer{k}": f"digits:{k}/3" for k in range(3)},
        },
        "model": model,
    }

    def call(target: Any, op: str, **kw: Any) -> dict[str, Any]:
        if op == Op.AUDIT_INPUTS:
            return state["inputs"]
        if op == Op.MODEL_GET:
            return {"cid": kw["cid"], "data": state["model"]}
        assert op == Op.AUDIT_RECORD and kw["session_id"] == "s1"
        state["recorded"] = check_record(kw["audit"])
        return {"session_id": "s1"}

    monkeypatch.setattr(cli_mod, "call", call)
    return state


def test_fedctl_audit_privacy_prints_the_four_figures(
    coordinator: dict[str, Any], terminal: io.StringIO
) -> None:
    args = ["audit", "privacy", "s1", "--shadows", "2", "--max-eval", "40"]
    result = CliRunner().invoke(cli_mod.app, args)
    assert result.exit_code == 0, (result.output, terminal.getvalue())
    out = SGR.sub("", terminal.getvalue())
    header = next(row for row in out.splitlines() if "AUC" in row)
    for column in ("attack", "accuracy", "TPR @ 0.1 % FPR", "TPR @ 1 % FPR"):
        assert column in header, out
    kept = coordinator["recorded"]
    for name in ("shadow", "lira"):
        row = next(r for r in out.splitlines() if r.strip("│ ").startswith(name))
        assert f"{kept['attacks'][name]['auc']:.3f}" in row, out
    assert "40 members (digits:0/3,digits:1/3,digits:2/3)" in out


def test_fedctl_audit_privacy_refuses_a_model_that_is_not_classification(
    coordinator: dict[str, Any], terminal: io.StringIO
) -> None:
    spec = specmod.validate(
        {
            "name": "reg",
            "model": {"kind": "mlp", "task": "regression", "inputs": 64, "classes": 1},
        }
    )
    coordinator["inputs"]["spec"] = spec
    result = CliRunner().invoke(cli_mod.app, ["audit", "privacy", "s1", "--json"])
    assert result.exit_code == 2  # bad input: fednode.output.USAGE_ERRORS
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "UNSUPPORTED" and "model.task" in error["message"]
    assert "recorded" not in coordinator


@pytest.mark.timeout(120)
@pytest.mark.slow  # 19 s; fast: the attacks (test_the_attacks_find_members_of_an_overfit_model)
# and the command's output and record (test_fedctl_audit_privacy_prints_the_four_figures)
def test_fedctl_audit_privacy_on_a_cluster(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "fed", 0)
    try:
        ids = future_ids(c, 3)
        sid = create(c, spec_file(tmp_path, "audited", rounds=1, participants=ids))
        for k in range(3):
            c.start_participant(k, 3)
        start_and_watch(c, sid)
        got = cli_json("audit", "privacy", sid, "--shadows", "2", "--max-eval", "50", target=c)
        assert got["members_data"] == "digits:0/3,digits:1/3,digits:2/3"
        assert got["nonmembers_data"] == "digits" and got["members"] == 50
        for name in ("shadow", "lira"):
            figures = got["attacks"][name]
            assert set(figures) == {"auc", "accuracy", "tpr_at_0_1pct_fpr", "tpr_at_1pct_fpr"}
            assert all(0.0 <= v <= 1.0 for v in figures.values())
        report = cli_json("report", sid, "--format", "json", target=c)["report"]
        kept = report["privacy_audit"]  # the ledger's audit event, by the operator
        assert kept["attacks"] == got["attacks"] and kept["by"].startswith("12D3KooW")
        assert "Privacy audit (membership inference)" in render_text(report)
        missing = cli("audit", "privacy", "no-such-session", "--json", target=c)
        assert missing.returncode == 1
        assert json.loads(missing.stdout)["error"]["code"] == "NOT_FOUND"
    finally:
        c.procs.stop_all()
