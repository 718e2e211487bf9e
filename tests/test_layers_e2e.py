"""A CNN declared as layers, end to end: real processes on 127.0.0.1, the embedded digits as
[1, 8, 8] images (features scale16), three participants, three rounds."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.numpy import load

from protocol import modelspec
from tests.conftest import cli, cli_json, start_cluster
from tests.test_quality_e2e import create, future_ids, spec_file

pytestmark = pytest.mark.timeout(180)

CNN = {
    "kind": "layers",
    "task": "classification",
    "input_shape": [1, 8, 8],
    "layers": [
        {"type": "conv2d", "out_channels": 8, "kernel_size": 3, "padding": 1},
        {"type": "batchnorm2d"},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "dropout", "p": 0.1},
        {"type": "linear", "out_features": 10},
    ],
}


@pytest.mark.slow  # 10 s; a layers CNN end to end: tests/test_examples_e2e.py (the MNIST example)
def test_a_cnn_declared_as_layers_learns_the_digits(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "fed", 0)
    try:
        ids = future_ids(c, 3)
        spec = spec_file(
            tmp_path,
            "cnn",
            rounds=3,
            participants=ids,
            min_participants=3,
            data={"features": "scale16"},
            model=CNN,
        )
        sid = create(c, spec)
        for k in range(3):
            c.start_participant(k, 3)
        assert cli_json("session", "start", sid, target=c)["status"] == "running"
        cli("session", "watch", sid, "--json", check=True, target=c, timeout=150)
        status = cli_json("session", "status", sid, target=c)
        assert status["status"] == "completed" and status["rounds_completed"] == 3, status
        acc = [h["accuracy"] for h in status["history"]]
        assert acc[-1] > 0.8, acc  # chance is 0.1

        # the global model is the declared CNN: the tensors modelspec names, and no
        # BatchNorm counter (it stays on each node)
        out = tmp_path / "model.safetensors"
        cli_json("model", "get", status["model_cid"], "-o", str(out), target=c)
        tensors = load(out.read_bytes())
        assert {k: v.shape for k, v in tensors.items()} == modelspec.shapes(CNN)
        assert "1.running_mean" in tensors and "1.num_batches_tracked" not in tensors
    finally:
        c.procs.stop_all()
