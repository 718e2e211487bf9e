"""Learning tasks (model.task): each one's loss and metrics, on tiny data (fednode/training.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fednode.data import Dataset
from fednode.training import (
    TrainConfig,
    _model_from_spec,
    evaluate,
    evaluate_metrics,
    get_weights,
    init_weights,
    set_weights,
    train,
)
from protocol.errors import DataError


def cfg(**kw) -> TrainConfig:
    base = {"local_epochs": 30, "batch_size": 16, "lr": 0.05, "optimizer": "adam", "momentum": 0}
    return TrainConfig(**(base | kw))


def small(task: str, outputs: int, *, batchnorm: bool = False) -> dict:
    norm = [{"type": "batchnorm1d"}] if batchnorm else []
    return {
        "kind": "layers",
        "task": task,
        "input_shape": [4],
        "layers": [
            {"type": "linear", "out_features": 16},
            *norm,
            {"type": "relu"},
            {"type": "linear", "out_features": outputs},
        ],
    }


def blobs(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 4)).astype(np.float32) + 2.0 * y[:, None].astype(np.float32)
    return x, y


def _logits(model: dict, w: dict, x: np.ndarray) -> torch.Tensor:
    net = _model_from_spec(model)
    set_weights(net, w)
    net.eval()
    with torch.no_grad():
        return net(torch.from_numpy(x))


def test_classification_is_cross_entropy_and_accuracy() -> None:
    x, y = blobs()
    data = Dataset(x, y.astype(np.int64))
    model = small("classification", 2)
    w = train(model, init_weights(model, 0), data, cfg(local_epochs=5)).weights
    figures = evaluate_metrics(model, w, data)
    assert set(figures) == {"accuracy", "loss"}
    out = _logits(model, w, x)
    want = float(nn.functional.cross_entropy(out, torch.from_numpy(y)))
    assert figures["loss"] == pytest.approx(want, rel=1e-5)
    assert figures["accuracy"] == pytest.approx(float((out.argmax(1).numpy() == y).mean()))
    assert figures["accuracy"] > 0.9
    assert evaluate(model, w, data) == (figures["accuracy"], figures["loss"])


def test_binary_is_bce_with_logits_accuracy_and_roc_auc() -> None:
    from sklearn.metrics import roc_auc_score

    x, y = blobs()
    data = Dataset(x, y.astype(np.int64))
    model = small("binary", 1)
    w0 = init_weights(model, 0)
    before = evaluate_metrics(model, w0, data)
    w = train(model, w0, data, cfg(local_epochs=5)).weights
    figures = evaluate_metrics(model, w, data)
    assert set(figures) == {"accuracy", "roc_auc", "loss"}
    score = _logits(model, w, x).reshape(-1)
    want = float(nn.functional.binary_cross_entropy_with_logits(score, torch.tensor(y).float()))
    assert figures["loss"] == pytest.approx(want, rel=1e-5)
    assert figures["accuracy"] == pytest.approx(float(((score > 0).numpy() == y).mean()))
    assert figures["roc_auc"] == pytest.approx(roc_auc_score(y, score.numpy()))
    assert figures["roc_auc"] > 0.95 and figures["loss"] < before["loss"]
    # one class only: ROC AUC is undefined and left out, accuracy still reported
    ones = Dataset(x[y == 1], y[y == 1].astype(np.int64))
    assert set(evaluate_metrics(model, w, ones)) == {"accuracy", "loss"}
    with pytest.raises(DataError, match=r"labels range over 0..2 .* 2 classes") as ei:
        evaluate_metrics(model, w, Dataset(x, (y * 2).astype(np.int64)))
    assert ei.value.hint == "binary labels are 0 or 1"


def test_regression_is_mse_on_float_targets_mae_and_r2() -> None:
    from sklearn.metrics import mean_absolute_error, r2_score

    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 4)).astype(np.float32)
    y = (x @ np.array([1.5, -2.0, 0.5, 1.0], dtype=np.float32) + 0.3).astype(np.float32)
    data = Dataset(x, y)  # float32 targets, as data sources give them for regression
    model = small("regression", 1)
    w = train(model, init_weights(model, 0), data, cfg()).weights
    figures = evaluate_metrics(model, w, data)
    assert set(figures) == {"mae", "r2", "loss"}
    pred = _logits(model, w, x).numpy()
    assert figures["loss"] == pytest.approx(float(np.mean((pred[:, 0] - y) ** 2)), rel=1e-4)
    assert figures["mae"] == pytest.approx(mean_absolute_error(y, pred[:, 0]), rel=1e-5)
    assert figures["r2"] == pytest.approx(r2_score(y, pred[:, 0]), rel=1e-5)
    assert figures["r2"] > 0.95
    # evaluate's first figure is R² for regression (higher is better, as for accuracy)
    assert evaluate(model, w, data) == (figures["r2"], figures["loss"])
    # two targets per example: y of shape [n, 2] and two outputs
    two = small("regression", 2)
    y2 = np.stack([y, -y], axis=1)
    w2 = train(two, init_weights(two, 0), Dataset(x, y2), cfg(local_epochs=2)).weights
    assert set(evaluate_metrics(two, w2, Dataset(x, y2))) == {"mae", "r2", "loss"}
    with pytest.raises(DataError, match="2 finite number"):
        evaluate_metrics(two, w2, data)
    with pytest.raises(DataError, match="not finite"):
        evaluate_metrics(model, w, Dataset(x, np.full(len(y), np.nan, dtype=np.float32)))


def test_fractional_labels_are_refused_for_classification() -> None:
    x, _ = blobs(20)
    model = small("classification", 2)
    with pytest.raises(DataError, match="whole class numbers") as ei:
        evaluate_metrics(model, init_weights(model, 0), Dataset(x, np.full(20, 0.5)))
    assert 'model.task = "regression"' in ei.value.hint


def test_a_layers_model_takes_flat_data_reshaped_to_its_input_shape() -> None:
    model = {
        "kind": "layers",
        "input_shape": [1, 8, 8],
        "layers": [
            {"type": "conv2d", "out_channels": 4, "kernel_size": 3},
            {"type": "flatten"},
            {"type": "linear", "out_features": 10},
        ],
    }
    rng = np.random.default_rng(0)
    data = Dataset(rng.normal(size=(30, 64)).astype(np.float32), rng.integers(0, 10, 30))
    res = train(model, init_weights(model, 0), data, cfg(local_epochs=1))
    assert res.weights["0.weight"].shape == (4, 1, 3, 3)
    with pytest.raises(DataError, match=r"64 inputs \(input_shape \[1, 8, 8\]\)"):
        train(model, res.weights, Dataset(data.x[:, :60], data.y), cfg(local_epochs=1))


def test_batchnorm_trains_and_its_counter_stays_home() -> None:
    """A last batch of one example is skipped (BatchNorm cannot normalise it), and the int64
    num_batches_tracked never enters the float32 weights."""
    x, y = blobs(33)
    model = small("classification", 2, batchnorm=True)
    w0 = init_weights(model, 0)
    assert "1.num_batches_tracked" not in w0
    assert {"1.running_mean", "1.running_var"} <= set(w0)
    res = train(model, w0, Dataset(x, y.astype(np.int64)), cfg(local_epochs=2, batch_size=32))
    assert res.steps == 2  # the 33rd example's batch of one is skipped each epoch
    assert not np.array_equal(res.weights["1.running_mean"], w0["1.running_mean"])
    net = _model_from_spec(model)
    set_weights(net, res.weights)
    assert set(get_weights(net)) == set(res.weights)
