"""protocol/modelspec.py: a spec's shapes, size and training memory without building it."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from fednode import training
from protocol import modelspec
from protocol.errors import ValidationError

PROBE = {"kind": "mlp", "inputs": 64, "hidden": [65536, 65536], "classes": 10}
SGD = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0, "batch_size": 32}


def _random_spec(rng: random.Random) -> dict:
    kind = rng.choice(["mlp", "mlp", "logreg"])
    hidden = [rng.randint(1, 40) for _ in range(rng.randint(0, 4))]
    return {
        "kind": kind,
        "inputs": rng.randint(1, 50),
        "hidden": hidden,
        "classes": rng.randint(1, 20),
    }


def test_shapes_match_torch_for_random_specs() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        m = _random_spec(rng)
        built = training.build_model(m["kind"], m["inputs"], m["hidden"], m["classes"])
        state = built.state_dict()
        got = modelspec.shapes(m)
        # names, order and shapes, exactly as torch's state_dict
        assert list(got.items()) == [(k, tuple(v.shape)) for k, v in state.items()], m
        assert modelspec.param_count(m) == sum(v.numel() for v in state.values())
        # the bytes torch holds for the weights are 4 per counted parameter
        assert 4 * modelspec.param_count(m) == sum(
            p.numel() * p.element_size() for p in built.parameters()
        )
        assert training.expected_shapes(m) == got


def test_logreg_ignores_hidden_and_mlp_without_hidden_is_one_layer() -> None:
    logreg = {"kind": "logreg", "inputs": 64, "hidden": [128, 128], "classes": 10}
    assert modelspec.shapes(logreg) == {"0.weight": (10, 64), "0.bias": (10,)}
    assert modelspec.shapes({"kind": "logreg", "inputs": 3, "classes": 2}) == {
        "0.weight": (2, 3),
        "0.bias": (2,),
    }
    assert modelspec.param_count(logreg) == 650
    mlp = {"kind": "mlp", "inputs": 64, "hidden": [128, 128], "classes": 10}
    assert list(modelspec.shapes(mlp)) == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
        "4.weight",
        "4.bias",
    ]


def test_the_probe_spec_is_priced_without_allocating() -> None:
    """hidden = [65536, 65536] made a participant allocate 17 GB to learn the shapes."""
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        n = modelspec.param_count(PROBE)
        need = modelspec.training_memory(PROBE, SGD, 479)
        shapes = training.expected_shapes(PROBE)
        took = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 64 * 65536 + 65536 + 65536 * 65536 + 65536 + 65536 * 10 + 10 == 4_299_948_042
    assert shapes["2.weight"] == (65536, 65536)
    assert need > 100 * 2**30  # over 100 GiB: far beyond any default limit of a small machine
    assert peak < 64 * 1024, peak  # kilobytes, not gigabytes
    assert took < 0.5


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "cnn", "inputs": 4, "hidden": [], "classes": 2},
        {"kind": "mlp", "inputs": 0, "hidden": [4], "classes": 2},
        {"kind": "mlp", "inputs": 4, "hidden": [4, 0], "classes": 2},
        {"kind": "mlp", "inputs": 4, "hidden": [4], "classes": -1},
        {"kind": "mlp", "inputs": True, "hidden": [4], "classes": 2},
        {"kind": "mlp", "inputs": 4.0, "hidden": [4], "classes": 2},
        {"kind": "mlp", "inputs": 4, "hidden": "4", "classes": 2},
        {"kind": "mlp", "hidden": [4], "classes": 2},
        [],
    ],
)
def test_bad_model_specs_are_refused(bad) -> None:
    with pytest.raises(ValidationError):
        modelspec.shapes(bad)


def test_memory_is_monotonic() -> None:
    base = {"kind": "mlp", "inputs": 64, "hidden": [128, 128], "classes": 10}
    mem = modelspec.training_memory
    # wider, deeper, more inputs or classes: more memory
    assert mem(base, SGD, 500) < mem(dict(base, hidden=[256, 128]), SGD, 500)
    assert mem(base, SGD, 500) < mem(dict(base, hidden=[128, 128, 128]), SGD, 500)
    assert mem(base, SGD, 500) < mem(dict(base, inputs=65), SGD, 500)
    assert mem(base, SGD, 500) < mem(dict(base, classes=11), SGD, 500)
    # more data, bigger batches (up to the data), heavier optimizers: more memory
    assert mem(base, SGD, 500) < mem(base, SGD, 501)
    assert mem(base, SGD, 500) < mem(base, dict(SGD, batch_size=64), 500)
    assert mem(base, dict(SGD, batch_size=500), 500) == mem(base, dict(SGD, batch_size=9999), 500)
    plain = dict(SGD, momentum=0.0)
    adam = dict(SGD, optimizer="adam")
    assert mem(base, plain, 500) < mem(base, SGD, 500) < mem(base, adam, 500)
    assert mem(base, adam, 500) < mem(base, dict(adam, weight_decay=0.01), 500)
    assert mem(base, SGD, 500) < mem(base, SGD, 500, secure=True)
    # every parameter is paid for at least as weights, gradients and the node's copies
    p = modelspec.param_count(base)
    assert mem(base, plain, 0) >= 4 * p * (2 + modelspec.NODE_COPIES)
    assert modelspec.default_max_params(48 * 10**6) == 10**6


def test_sizes_for_people() -> None:
    assert modelspec.format_size(512) == "512 B"
    assert modelspec.format_size(1536) == "1.5 KiB"
    assert modelspec.format_size(4 * 2**30) == "4.0 GiB"
    assert modelspec.format_size(3 * 2**40) == "3.0 TiB"


_MEASURE = r"""
import gc, json, sys
import torch
from fednode import training
from fednode.data import load_partition
from protocol import modelspec

torch.set_num_threads(1)
training.warm_up()
m, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
data = load_partition("digits:0/3", features="standardize", partition="iid", seed=0)
w = training.init_weights(m, 0)
gc.collect()

def rss(field):  # VmRSS (now) or VmHWM (the peak since the last reset), in bytes
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

# Reset the peak to what is resident now (Linux: "5" to clear_refs), so that a transient
# peak while loading the data is not taken for training's.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = rss("VmRSS")
cfg = training.TrainConfig(local_epochs=1, batch_size=t["batch_size"], lr=0.01,
                           optimizer=t["optimizer"], momentum=t["momentum"])
training.train(m, w, data, cfg)
after = rss("VmHWM")
print(json.dumps({"grown": after - before, "n": len(data)}))
"""


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset"
)
def test_memory_estimate_is_plausible_against_torch(optimizer: str, tmp_path: Path) -> None:
    """Train a 4.35M-parameter model (17 MB of weights) in a fresh process and compare the
    peak RSS it added with the estimate: the estimate covers it, and is not absurdly above."""
    m = {"kind": "mlp", "inputs": 64, "hidden": [2048, 2048], "classes": 10}
    t = dict(SGD, optimizer=optimizer)
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps(m), json.dumps(t)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    estimate = modelspec.training_memory(m, t, got["n"])
    param_bytes = 4 * modelspec.param_count(m)
    # local training alone: at least the weights and gradients, at most the estimate
    # (which also counts the node's copies around training)
    assert 2 * param_bytes <= got["grown"] <= estimate, (got, estimate)
    assert estimate <= 4 * got["grown"], (got, estimate)
