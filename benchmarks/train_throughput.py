"""Local training throughput: fednode's training step against a bare torch loop, same model.

What a participant does each round is `fednode.training.train`: build the model from the
spec, load the round's weights, shuffle with the round's seed, run the epochs with the
deadline and stop checks, return the weights as float32 arrays. The reference is the
plainest loop torch allows over the same tensors: the same architecture written directly
in `torch.nn`, the same optimizer, batch size and epochs, no checks. Both are timed in this
process, one after the other, on the same data, and the figure is examples per second.

Models: the benchmark MLP (64 → H → H → 10, H = 128 and 1024, the digits features) and the
MNIST-shaped CNN of the examples (1×28×28 inputs: conv 32 → pool → conv 64 → pool → 128 →
10), trained on the digits upscaled to 28×28 (real MNIST is not downloadable here; the
shapes and so the cost per example are MNIST's).

    .venv/bin/python benchmarks/train_throughput.py                  # CPU, 1 torch thread
    .venv/bin/python benchmarks/train_throughput.py --device cuda    # where a GPU is
    .venv/bin/python benchmarks/train_throughput.py --json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from fednode import training
from fednode.data import Dataset, apply_features, digits_split

CNN_LAYERS: list[dict[str, Any]] = [
    {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1},
    {"type": "relu"},
    {"type": "maxpool2d", "kernel_size": 2},
    {"type": "conv2d", "out_channels": 64, "kernel_size": 3, "padding": 1},
    {"type": "relu"},
    {"type": "maxpool2d", "kernel_size": 2},
    {"type": "flatten"},
    {"type": "linear", "out_features": 128},
    {"type": "relu"},
    {"type": "linear", "out_features": 10},
]


def cnn_spec() -> dict[str, Any]:
    return {
        "kind": "layers",
        "task": "classification",
        "input_shape": [1, 28, 28],
        "layers": CNN_LAYERS,
        "inputs": 28 * 28,
        "hidden": [],
        "classes": 10,
    }


def bare_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def mlp_spec(hidden: int) -> dict[str, Any]:
    return {"kind": "mlp", "inputs": 64, "hidden": [hidden, hidden], "classes": 10}


def bare_mlp(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def digits(shape: tuple[int, ...]) -> Dataset:
    """The digits training split, pixels/16; upscaled 8×8 → 28×28 (nearest, then padded)
    when ``shape`` asks for MNIST's size."""
    x, y, _, _ = digits_split(0)
    x, _ = apply_features(x, None, "scale16")
    if shape != (64,):
        img = x.reshape(-1, 8, 8).repeat(3, axis=1).repeat(3, axis=2)  # 24×24
        img = np.pad(img, ((0, 0), (2, 2), (2, 2)))  # 28×28
        x = img.reshape(len(img), -1)
    return Dataset(np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64))


def bare_loop(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float
) -> None:
    """The reference: the plainest SGD loop over the same tensors."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()


def timed(fn: Callable[[], None], repeat: int) -> float:
    """Median seconds of ``repeat`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(
    name: str,
    spec: dict[str, Any],
    bare: Callable[[], nn.Module],
    shape: tuple[int, ...],
    *,
    epochs: int,
    batch: int,
    repeat: int,
    device: str,
) -> dict[str, Any]:
    data = digits(shape if shape != (64,) else (64,))
    n = len(data) * epochs
    cfg = training.TrainConfig(
        local_epochs=epochs, batch_size=batch, lr=0.01, optimizer="sgd", momentum=0.9, seed=0
    )
    w0 = training.init_weights(spec, 0)
    ours = timed(lambda: training.train(spec, w0, data, cfg), repeat)
    dev = torch.device(device)
    x = torch.from_numpy(data.x).reshape(len(data), *shape).to(dev)
    y = torch.from_numpy(data.y).to(dev)
    model = bare().to(dev)
    ref = timed(lambda: bare_loop(model, x, y, epochs, batch, 0.01), repeat)
    return {
        "model": name,
        "examples": n,
        "fednode_examples_per_s": n / ours,
        "bare_torch_examples_per_s": n / ref,
        "ratio": ref / ours,
        "device": device,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a node's default)")
    ap.add_argument("--device", default="cpu", help="both sides' device: cpu, cuda, auto, ...")
    ap.add_argument("--models", nargs="+", default=["mlp128", "mlp1024", "cnn"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    training.use_device(args.device)  # fednode's side on the same device as the reference
    training.warm_up()
    cases = {
        "mlp128": (mlp_spec(128), lambda: bare_mlp(128), (64,)),
        "mlp1024": (mlp_spec(1024), lambda: bare_mlp(1024), (64,)),
        "cnn": (cnn_spec(), bare_cnn, (1, 28, 28)),
    }
    rows = []
    for name in args.models:
        spec, bare, shape = cases[name]
        rows.append(
            measure(
                name,
                spec,
                bare,
                shape,
                epochs=args.epochs,
                batch=args.batch_size,
                repeat=args.repeat,
                device=args.device,
            )
        )
    machine = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if args.json:
        print(json.dumps({"machine": machine, "results": rows}))
        return 0
    print(
        f"torch {machine['torch']}, {machine['threads']} thread(s), epochs {args.epochs}, "
        f"batch {args.batch_size}, median of {args.repeat}"
    )
    print(f"{'model':8} {'fednode ex/s':>14} {'bare torch ex/s':>16} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['model']:8} {r['fednode_examples_per_s']:14,.0f} "
            f"{r['bare_torch_examples_per_s']:16,.0f} {r['ratio']:6.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
