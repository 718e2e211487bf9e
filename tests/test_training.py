from __future__ import annotations

import numpy as np
import pytest
import torch

from fednode.data import Dataset, load_eval, load_partition
from fednode.training import TrainConfig, build_model, evaluate, init_weights, train
from protocol.errors import DataError, ValidationError

SPEC = {"kind": "mlp", "inputs": 64, "hidden": [32, 32], "classes": 10}


@pytest.fixture(scope="module")
def shard() -> Dataset:
    return load_partition("digits:0/3", features="standardize", partition="iid", seed=0)


def cfg(**kw) -> TrainConfig:
    base = {
        "local_epochs": 1,
        "batch_size": 32,
        "lr": 0.05,
        "optimizer": "sgd",
        "momentum": 0.9,
        "seed": 0,
    }
    return TrainConfig(**(base | kw))


def test_build_model_shapes():
    m = build_model("mlp", 64, [128, 128], 10)
    names = [k for k, _ in m.state_dict().items()]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert m(torch.zeros(5, 64)).shape == (5, 10)
    assert list(build_model("logreg", 64, [], 10).state_dict()) == ["0.weight", "0.bias"]
    with pytest.raises(ValidationError, match="cnn"):
        build_model("cnn", 64, [], 10)


def test_init_weights_is_seeded():
    a, b, c = init_weights(SPEC, 0), init_weights(SPEC, 0), init_weights(SPEC, 1)
    assert list(a) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert all(v.dtype == np.float32 for v in a.values())
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["0.weight"], c["0.weight"])
    # the benchmark's recipe: torch.manual_seed(0) then build
    torch.manual_seed(0)
    ref = build_model("mlp", 64, [32, 32], 10).state_dict()
    assert np.array_equal(ref["0.weight"].numpy(), a["0.weight"])


def test_training_lowers_loss(shard):
    w0 = init_weights(SPEC, 0)
    before = evaluate(SPEC, w0, shard)[1]
    res = train(SPEC, w0, shard, cfg(local_epochs=2))
    after = evaluate(SPEC, res.weights, shard)[1]
    assert after < before * 0.7
    assert res.num_examples == len(shard) == 479
    assert res.steps == 2 * 15  # ceil(479 / 32) per epoch
    assert res.duration_s > 0 and np.isfinite(res.loss)
    assert list(res.weights) == list(w0)
    assert all(v.dtype == np.float32 for v in res.weights.values())
    # the input weights are not modified in place
    assert np.array_equal(w0["0.weight"], init_weights(SPEC, 0)["0.weight"])


def test_adam_and_logreg(shard):
    spec = {"kind": "logreg", "inputs": 64, "hidden": [], "classes": 10}
    w0 = init_weights(spec, 0)
    res = train(spec, w0, shard, cfg(optimizer="adam", lr=0.01))
    assert evaluate(spec, res.weights, shard)[1] < evaluate(spec, w0, shard)[1]


def test_evaluate_range(shard):
    test = load_eval("digits", features="standardize", seed=0)
    acc, loss = evaluate(SPEC, init_weights(SPEC, 0), test)
    assert 0.0 <= acc <= 1.0 and loss > 0
    trained = train(SPEC, init_weights(SPEC, 0), shard, cfg(local_epochs=3)).weights
    acc2, loss2 = evaluate(SPEC, trained, test, batch_size=7)
    assert 0.8 < acc2 <= 1.0 and loss2 < loss
    assert (acc2, loss2) == pytest.approx(evaluate(SPEC, trained, test))


def test_determinism(shard):
    w0 = init_weights(SPEC, 0)
    a = train(SPEC, w0, shard, cfg(seed=7))
    b = train(SPEC, w0, shard, cfg(seed=7))
    c = train(SPEC, w0, shard, cfg(seed=8))
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in w0)
    assert a.loss == b.loss
    assert not np.array_equal(a.weights["0.weight"], c.weights["0.weight"])


def test_fedprox_keeps_weights_closer(shard):
    w0 = init_weights(SPEC, 0)

    def dist(w):
        return sum(float(((w[k] - w0[k]) ** 2).sum()) for k in w0)

    free = train(SPEC, w0, shard, cfg(local_epochs=2))
    prox = train(SPEC, w0, shard, cfg(local_epochs=2, proximal_mu=1.0))
    assert dist(prox.weights) < dist(free.weights)


def test_bad_inputs(shard):
    w0 = init_weights(SPEC, 0)
    with pytest.raises(ValidationError):
        train(SPEC, w0, shard, cfg(optimizer="rmsprop"))
    with pytest.raises(ValidationError):
        train(SPEC, w0, shard, cfg(batch_size=0))
    with pytest.raises(ValidationError, match=r"'4\.bias'"):
        train(SPEC, dict(w0, **{"4.bias": np.zeros(3, np.float32)}), shard, cfg())
    with pytest.raises(DataError, match="features"):
        train(SPEC, w0, Dataset(shard.x[:, :10], shard.y), cfg())
    with pytest.raises(DataError, match="labels"):
        train(SPEC, w0, Dataset(shard.x, shard.y + 5), cfg())


def test_expected_shapes_match_a_built_model() -> None:
    from fednode.training import expected_shapes, init_weights

    spec = {"kind": "mlp", "inputs": 64, "hidden": [16, 8], "classes": 10}
    assert expected_shapes(spec) == {k: v.shape for k, v in init_weights(spec, 0).items()}


def test_device_names_resolve_or_are_refused():
    from fednode.training import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type == expected
    for bad in ("gpu", "cuda:x", "cpu:0;rm"):
        with pytest.raises(ValidationError, match="is not a device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValidationError, match="CUDA device"):
            resolve_device("cuda:1")


def test_fednode_run_refuses_a_device_the_machine_lacks(tmp_path):
    """Checked before the node serves anything: exit 2 with the reason, nothing started."""
    import subprocess
    import sys

    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 or more CUDA devices")
    home = tmp_path / "node"
    run = [sys.executable, "-m", "fednode"]
    subprocess.run([*run, "init", "--data-dir", str(home)], check=True, capture_output=True)
    done = subprocess.run(
        [*run, "run", "--role", "coordinator", "--data-dir", str(home), "--listen",
         "127.0.0.1:0", "--device", "cuda:9"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--device cuda:9" in done.stderr and "CUDA device" in done.stderr
