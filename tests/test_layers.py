"""Declared layers (model.kind = "layers"): protocol/layers.py's arithmetic against torch,
and every refusal naming the layer's index, type and key."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fednode import training
from protocol import layers, modelspec
from protocol import spec as specmod
from protocol.errors import SpecError
from tests.conftest import cli, cli_json

# (input_shape, layers): every layer type, several configurations each
CASES: list[tuple[list[int], list[dict[str, Any]]]] = [
    ([5], [{"type": "linear", "out_features": 3}]),
    ([5], [{"type": "linear", "out_features": 4, "bias": False, "in_features": 5}]),
    ([2, 6], [{"type": "linear", "out_features": 4}]),  # acts on the last dimension
    (
        [3, 20],
        [
            {
                "type": "conv1d",
                "out_channels": 4,
                "kernel_size": 3,
                "stride": 2,
                "padding": 1,
                "dilation": 2,
            }
        ],
    ),
    ([3, 20], [{"type": "conv1d", "out_channels": 6, "kernel_size": 4, "groups": 3}]),
    (
        [2, 9],
        [{"type": "conv1d", "out_channels": 2, "kernel_size": 3, "dilation": 2, "padding": "same"}],
    ),
    ([2, 9], [{"type": "conv1d", "out_channels": 2, "kernel_size": 9, "padding": "valid"}]),
    (
        [3, 9, 7],
        [
            {
                "type": "conv2d",
                "out_channels": 5,
                "kernel_size": [3, 2],
                "stride": [2, 1],
                "padding": [1, 0],
                "dilation": [1, 2],
                "bias": False,
            }
        ],
    ),
    ([4, 6, 6], [{"type": "conv2d", "out_channels": 8, "kernel_size": 3, "groups": 2}]),
    ([2, 11], [{"type": "maxpool1d", "kernel_size": 3, "stride": 2, "padding": 1}]),
    ([2, 11], [{"type": "maxpool1d", "kernel_size": 2, "dilation": 2, "ceil_mode": True}]),
    ([2, 9, 10], [{"type": "maxpool2d", "kernel_size": 3, "stride": 2, "ceil_mode": True}]),
    ([2, 9, 10], [{"type": "maxpool2d", "kernel_size": [2, 3], "padding": [1, 1]}]),
    (
        [2, 7, 7],
        [
            {
                "type": "avgpool2d",
                "kernel_size": 3,
                "stride": 2,
                "padding": 1,
                "ceil_mode": True,
                "count_include_pad": False,
            }
        ],
    ),
    ([3, 9, 7], [{"type": "adaptiveavgpool2d", "output_size": 2}]),
    ([3, 9, 7], [{"type": "adaptiveavgpool2d", "output_size": [4, 5]}]),
    ([2, 3, 4], [{"type": "flatten"}]),
    ([2, 3, 4], [{"type": "flatten", "start_dim": 2}]),
    ([2, 3, 4], [{"type": "flatten", "start_dim": 1, "end_dim": -2}]),
    (
        [4],
        [
            {"type": "relu"},
            {"type": "leakyrelu", "negative_slope": 0.2},
            {"type": "gelu", "approximate": "tanh"},
            {"type": "tanh"},
            {"type": "sigmoid"},
            {"type": "dropout", "p": 0.3},
        ],
    ),
    ([3, 5], [{"type": "layernorm"}]),
    ([3, 5], [{"type": "layernorm", "normalized_shape": [3, 5], "bias": False}]),
    ([3, 5], [{"type": "layernorm", "elementwise_affine": False, "eps": 1e-3}]),
    ([6, 4, 4], [{"type": "groupnorm", "num_groups": 3}]),
    ([6], [{"type": "groupnorm", "num_groups": 2, "affine": False, "num_channels": 6}]),
    ([5], [{"type": "batchnorm1d"}]),
    ([5, 7], [{"type": "batchnorm1d", "momentum": 0.2, "affine": False}]),
    ([5], [{"type": "batchnorm1d", "track_running_stats": False}]),
    ([3, 4, 4], [{"type": "batchnorm2d", "eps": 1e-3}]),
    # the CNN, at 8x8
    (
        [1, 8, 8],
        [
            {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1},
            {"type": "relu"},
            {"type": "maxpool2d", "kernel_size": 2},
            {"type": "flatten"},
            {"type": "linear", "out_features": 128},
            {"type": "relu"},
            {"type": "dropout", "p": 0.25},
            {"type": "linear", "out_features": 10},
        ],
    ),
]


def _model(shape: list[int], declared: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kind": "layers", "input_shape": shape, "layers": declared}


def test_every_layer_type_has_a_case() -> None:
    covered = {layer["type"] for _, declared in CASES for layer in declared}
    assert covered == set(layers.TYPES)


@pytest.mark.parametrize(("shape", "declared"), CASES)
def test_shapes_names_and_outputs_match_torch(shape: list[int], declared: list[dict]) -> None:
    m = _model(shape, declared)
    torch.manual_seed(0)
    net = training._model_from_spec(m)
    state = {
        k: tuple(v.shape)
        for k, v in net.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    # names, order and shapes of what travels, exactly as torch's state_dict
    assert list(modelspec.shapes(m).items()) == list(state.items())
    assert modelspec.param_count(m) == sum(math_prod(s) for s in state.values())
    # every inferred output shape is the one a real forward pass gives (train and eval mode)
    plan = modelspec.model_layers(m)
    for mode in (True, False):
        net.train(mode)
        x = torch.randn(3, *shape)
        for layer, module in zip(plan, net, strict=True):
            x = module(x)
            assert tuple(x.shape[1:]) == layer.out_shape, (layer, mode)
    # the weights round-trip through the float32 dict the node sends
    w = training.get_weights(net)
    assert all(v.dtype.name == "float32" for v in w.values())
    assert set(w) == set(modelspec.shapes(m))
    training.set_weights(training._model_from_spec(m), w)


def math_prod(shape: tuple[int, ...]) -> int:
    out = 1
    for v in shape:
        out *= v
    return out


def test_pool_and_conv_arithmetic_agree_with_torch_everywhere() -> None:
    """Output lengths for many sizes, kernels, strides, paddings, dilations and ceil_mode,
    and the inputs that are too small: torch refuses exactly those."""
    for size, k, s, d, ceil in itertools.product(
        range(1, 10), range(1, 5), range(1, 4), (1, 2), (False, True)
    ):
        for p in range(0, k // 2 + 1):
            want = layers.pool_out(size, k, s, p, d, ceil)
            pool = nn.MaxPool1d(k, s, p, d, ceil_mode=ceil)
            if want < 1:
                with pytest.raises(RuntimeError):
                    pool(torch.zeros(1, 1, size))
            else:
                assert pool(torch.zeros(1, 1, size)).shape[-1] == want, (size, k, s, p, d, ceil)
            if d == 1:
                avg = nn.AvgPool1d(k, s, p, ceil_mode=ceil)
                if want >= 1:
                    assert avg(torch.zeros(1, 1, size)).shape[-1] == want
            conv_want = layers.conv_out(size, k, s, p, d)
            conv = nn.Conv1d(1, 1, k, s, p, d)
            if conv_want < 1:
                with pytest.raises(RuntimeError):
                    conv(torch.zeros(1, 1, size))
            else:
                assert conv(torch.zeros(1, 1, size)).shape[-1] == conv_want


def test_mlp_and_logreg_keep_their_names_through_the_same_machinery() -> None:
    mlp = {"kind": "mlp", "inputs": 64, "hidden": [32, 16], "classes": 10}
    assert [layer.type for layer in modelspec.model_layers(mlp)] == [
        "linear",
        "relu",
        "linear",
        "relu",
        "linear",
    ]
    assert list(modelspec.shapes(mlp)) == [
        f"{i}.{t}" for i in (0, 2, 4) for t in ("weight", "bias")
    ]
    declared = _model(
        [64],
        [
            {"type": "linear", "out_features": 32},
            {"type": "relu"},
            {"type": "linear", "out_features": 16},
            {"type": "relu"},
            {"type": "linear", "out_features": 10},
        ],
    )
    assert modelspec.shapes(declared) == modelspec.shapes(mlp)
    # the same activations too: the mlp's memory formula is unchanged
    sgd = {"optimizer": "sgd", "momentum": 0.9, "batch_size": 32}
    assert modelspec.training_memory(declared, sgd, 100) == modelspec.training_memory(mlp, sgd, 100)
    assert modelspec.activation_values(mlp) == 64 + 4 * (32 + 16) + 3 * 10


def test_memory_counts_what_convolutions_and_pools_keep() -> None:
    sgd = {"optimizer": "sgd", "momentum": 0.0, "batch_size": 10}
    base = _model([1, 8, 8], [{"type": "flatten"}, {"type": "linear", "out_features": 10}])
    conv = _model(
        [1, 8, 8],
        [
            {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": 1},
            {"type": "maxpool2d", "kernel_size": 2},
            {"type": "flatten"},
            {"type": "linear", "out_features": 10},
        ],
    )
    # input 64, conv out 256 (x2) + unfolded 9 x 64, pool out 64 (x2) + int64 indices (2 x 64),
    # flatten 64 (x2), logits 10 (x3)
    assert modelspec.activation_values(conv) == 64 + 512 + 576 + 128 + 128 + 128 + 30
    assert modelspec.training_memory(conv, sgd, 0) > modelspec.training_memory(base, sgd, 0)


# --- refusals ----------------------------------------------------------------------------

CNN = [
    {"type": "conv2d", "out_channels": 4, "kernel_size": 3},
    {"type": "relu"},
    {"type": "flatten"},
    {"type": "linear", "out_features": 10},
]


def _with(index: int, **change: Any) -> list[dict[str, Any]]:
    out = [dict(layer) for layer in CNN]
    out[index] = {**out[index], **change}
    return out


@pytest.mark.parametrize(
    ("model", "says"),
    [
        (
            {"layers": _with(1, type="conv3d")},
            ["model.layers[1]", "'conv3d'", "accepted types: linear, conv1d"],
        ),
        (
            {"layers": _with(3, units=10)},
            ["model.layers[3] (linear)", "unknown key 'units'", "out_features, bias"],
        ),
        (
            {"layers": _with(0, out_channels=0)},
            ["model.layers[0] (conv2d)", "out_channels = 0", "[1, 4096]"],
        ),
        (
            {"layers": _with(0, kernel_size=65)},
            ["model.layers[0] (conv2d)", "kernel_size = 65", "[1, 64]"],
        ),
        (
            {"layers": _with(0, kernel_size="3")},
            ["model.layers[0] (conv2d)", "kernel_size = '3'", "a list of 2"],
        ),
        (
            {"layers": _with(0, padding="full")},
            ["model.layers[0] (conv2d)", "padding = 'full'", '"same" / "valid"'],
        ),
        (
            {"layers": [*CNN[:3], {"type": "dropout", "p": 1.5}, CNN[3]]},
            ["model.layers[3] (dropout)", "p = 1.5", "[0, 1]"],
        ),
        (
            {"layers": _with(3, out_features=None)},
            ["model.layers[3] (linear)", "out_features"],
        ),
        (
            {"layers": [CNN[0], CNN[1], CNN[2], {"type": "linear"}]},
            ["model.layers[3] (linear)", "lacks out_features"],
        ),
        (
            {"layers": _with(0, kernel_size=9)},
            ["model.layers[0] (conv2d)", "kernel_size = [9, 9]", "does not fit", "[8, 8]"],
        ),
        (
            {"input_shape": [64]},
            ["model.layers[0] (conv2d)", "[channels, height, width]", "[64]"],
        ),
        (
            {"layers": _with(3, in_features=100)},
            ["model.layers[3] (linear)", "in_features = 100", "set it to 144"],
        ),
        (
            {"layers": [*CNN[:2], {"type": "groupnorm", "num_groups": 3}, *CNN[2:]]},
            ["model.layers[2] (groupnorm)", "num_groups = 3", "divide the 4 channels", "[1, 2, 4]"],
        ),
        (
            {"layers": [{"type": "maxpool2d", "kernel_size": 2, "padding": 2}, *CNN]},
            ["model.layers[0] (maxpool2d)", "padding = [2, 2]", "half of kernel_size"],
        ),
        (
            {
                "layers": [
                    {"type": "flatten", "start_dim": 0},
                    {"type": "linear", "out_features": 2},
                ]
            },
            ["model.layers[0] (flatten)", "start_dim = 0", "batch"],
        ),
        (
            {"layers": _with(3, out_features=1)},
            ["model.layers[3] (linear)", "outputs 1 values", "'classification'", "at least 2"],
        ),
        (
            {"task": "binary"},
            ["model.layers[3] (linear)", "outputs 10 values", "'binary'", "exactly 1"],
        ),
        (
            {"layers": CNN[:2]},
            ["model.layers[1] (relu)", "outputs shape [4, 6, 6]", "flatten"],
        ),
        ({"layers": [{"type": "relu"}] * 65}, ["model.layers", "at most 64 tables"]),
        ({"input_shape": [1, 1, 8, 8]}, ["model.input_shape", "a list of 1 to 3 integers"]),
        ({"input_shape": []}, ["model.input_shape", 'kind = "layers" needs']),
        ({"inputs": 100}, ["model.inputs = 100", "declared layers give 64"]),
        ({"layers": []}, ["model.layers", "not a non-empty list"]),
        ({"layers": ["relu"]}, ["model.layers", "tables"]),
    ],
)
def test_refusals_name_the_layer_and_the_key(model: dict[str, Any], says: list[str]) -> None:
    raw = {"model": {"kind": "layers", "input_shape": [1, 8, 8], "layers": CNN} | model}
    raw["model"] = {k: v for k, v in raw["model"].items()}
    with pytest.raises(SpecError) as ei:
        specmod.validate(raw)
    assert ei.value.code == "SPEC_INVALID"
    text = ei.value.message + " | " + ei.value.hint
    for part in says:
        assert part in text, (part, text)


def test_layers_are_only_for_kind_layers_and_the_rest_stays_valid() -> None:
    with pytest.raises(SpecError, match=r"model.layers is set but model.kind = .mlp."):
        specmod.validate({"model": {"layers": CNN}})
    with pytest.raises(SpecError, match="'binary' needs exactly 1"):
        specmod.validate({"model": {"task": "binary"}})  # an mlp of 10 classes
    assert specmod.validate({})["model"]["task"] == "classification"
    ok = specmod.validate({"model": {"kind": "layers", "input_shape": [1, 8, 8], "layers": CNN}})
    assert (ok["model"]["inputs"], ok["model"]["classes"]) == (64, 10)
    assert specmod.validate(ok) == ok  # a participant re-validates what it is sent
    binary = {
        "kind": "layers",
        "task": "binary",
        "input_shape": [4],
        "layers": [{"type": "linear", "out_features": 1}],
    }
    assert specmod.validate({"model": binary})["model"]["classes"] == 2
    regression = binary | {"task": "regression", "layers": [{"type": "linear", "out_features": 3}]}
    assert specmod.validate({"model": regression})["model"]["classes"] == 3


def test_template_documents_the_new_keys_and_stays_valid_toml() -> None:
    import tomllib

    text = specmod.template()
    parsed = tomllib.loads(text)
    assert specmod.validate(parsed)["model"]["kind"] == "mlp"
    for key in ("task = ", "input_shape = []", "layers = []", "batchnorm2d", "regression"):
        assert key in text


def test_too_big_a_declared_model_is_refused_by_arithmetic() -> None:
    huge = [
        {"type": "flatten"},
        {"type": "linear", "out_features": 65_536},
        {"type": "linear", "out_features": 65_536},
        {"type": "linear", "out_features": 10},
    ]
    with pytest.raises(SpecError, match=r"kind layers, input_shape \[1, 8, 8\], 4 layers"):
        specmod.validate({"model": {"kind": "layers", "input_shape": [1, 8, 8], "layers": huge}})


# --- fedctl model describe ---------------------------------------------------------------


def test_fedctl_model_describe_a_cnn(tmp_path: Path) -> None:
    path = tmp_path / "cnn.toml"
    path.write_text(
        "[model]\n"
        'kind = "layers"\n'
        "input_shape = [1, 8, 8]\n"
        "layers = [\n"
        '  { type = "conv2d", out_channels = 8, kernel_size = 3, padding = 1 },\n'
        '  { type = "relu" },\n'
        '  { type = "maxpool2d", kernel_size = 2 },\n'
        '  { type = "flatten" },\n'
        '  { type = "linear", out_features = 10 },\n'
        "]\n"
        "[training]\nbatch_size = 16\n"
    )
    got = cli_json("model", "describe", str(path))
    assert got["ok"] is True
    assert [(r["index"], r["type"], r["output_shape"], r["params"]) for r in got["layers"]] == [
        (0, "conv2d", [8, 8, 8], 80),
        (1, "relu", [8, 8, 8], 0),
        (2, "maxpool2d", [8, 4, 4], 0),
        (3, "flatten", [128], 0),
        (4, "linear", [10], 1290),
    ]
    assert got["params"] == 1370 and got["bytes"] == 4 * 1370
    model = specmod.load(path)["model"]
    sgd = {"optimizer": "sgd", "momentum": 0.9, "batch_size": 16, "weight_decay": 0.0}
    assert got["training_memory"] == modelspec.training_memory(model, sgd, 0)
    assert got["batch_size"] == 16

    human = cli("model", "describe", str(path), check=True).stdout
    assert "maxpool2d" in human and "[8, 4, 4]" in human and "1,370" in human

    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {"model": {"kind": "layers", "input_shape": [1, 8, 8], "layers": _with(3, units=1)}}
        )
    )
    proc = cli("model", "describe", str(bad), "--json")
    assert proc.returncode != 0
    err = json.loads(proc.stdout.strip().splitlines()[-1])
    assert err["ok"] is False and err["error"]["code"] == "SPEC_INVALID"
    assert "model.layers[3] (linear): unknown key 'units'" in err["error"]["message"]
