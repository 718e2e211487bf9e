"""The session spec: every field explicit, validated strictly.

The schema below is the single source for validation, for ``fedctl session init`` (which
writes every field with its comment and accepted values) and for the defaults, which are
the demo's: they converge on the digits data (`fedctl demo`). A spec is refused with
a SpecError that names the field, the bad value and what is accepted: an unknown field, a
wrong type and an out-of-range value alike. Secure aggregation is checked against the
strategy (the coordinator sees only a sum, so only a function of the weighted mean can be
computed) and its fixed point against the number of participants (bits, clip and max_weight
must leave enough fraction bits for them); the robust strategies' settings are checked
against min_participants.
"""

from __future__ import annotations

import copy
import json
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol import fingerprint, layers, limits, modelspec, plugins, secagg, selection
from protocol.errors import IdentityError, SpecError, ValidationError
from protocol.identity import public_key_from_peer_id

PARTITIONS = ("iid", "stratified", "sequential", "dirichlet", "label_skew", "group")
FEATURES = ("standardize", "scale16", "none")
# Where each round's model is evaluated ([evaluation] on): on the coordinator's data.dataset,
# on each participant's held-out local split (reported with its update), or both.
EVALUATION_PLACES = ("coordinator", "participants", "both")
#: data.dataset when the coordinator holds no data (evaluation.on = "participants").
NO_DATASET = "none"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# The file and folder sources a coordinator may evaluate on (fednode/data.py SOURCES names
# them all; tests/test_data_sources.py checks the two agree), besides "digits" and "none".
EVAL_SOURCES = ("csv", "parquet", "npz", "idx", "images")
MAX_NAME_CHARS = 200  # a column name or class value in the schema
MAX_LIST = 100_000  # entries of a schema list (classes, columns)
# With secure aggregation, the fixed point must fit the round's participants; when neither
# max_participants nor a participants list bounds them, validation assumes this many.
SECURE_PARTICIPANTS_BOUND = 1000


@dataclass(frozen=True)
class Field:
    # int | float | bool | text | choice | int_list | float_list | text_list | class_list |
    # peer_list | dataset | name | neighbours | factory | kwargs | fingerprint
    kind: str
    default: Any
    doc: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    # a "choice" among the names registered in a plug point (protocol.plugins), read when a
    # spec is checked, so that a plug-in registered after import is accepted too
    registry: plugins.Registry[Any] | None = None

    def accepted(self) -> tuple[str, ...]:
        return self.registry.names() if self.registry is not None else self.choices


# Top-level fields first, then sections; order is the order `session init` writes.
SCHEMA: dict[str, dict[str, Field]] = {
    "": {
        "name": Field("name", "digits-mlp", "a label for people; letters, digits, _ . -"),
        "rounds": Field("int", 10, "rounds of training", 1, 100_000),
        "min_participants": Field(
            "int",
            3,
            "a round starts only with this many online, and fails if fewer return an update",
            1,
            10_000,
        ),
        "max_participants": Field(
            "int",
            0,
            "at most this many updates per round (selection.over_selection asks more and "
            "uses the first that arrive); 0 = every online participant",
            0,
            10_000,
        ),
        "participants": Field(
            "peer_list",
            [],
            "peer IDs admitted without an invite; empty = only participants holding an invite "
            "for this session (`fedctl invite --session ID`)",
        ),
        "round_timeout_s": Field("float", 300.0, "seconds a round waits for updates", 1, 86_400),
        "on_round_failure": Field(
            "choice",
            "stop",
            "a failed or aborted round stops the session, or the next round starts from "
            "the same model (it counts toward rounds)",
            choices=("stop", "continue"),
        ),
        "wait_participants_s": Field(
            "float",
            120.0,
            "seconds to wait for min_participants before the session fails",
            1,
            86_400,
        ),
    },
    "data": {
        "dataset": Field(
            "dataset",
            "digits",
            "evaluation data on the coordinator: digits (embedded test split), a file "
            "csv:/path, parquet:/path, npz:/path, a folder idx:/dir or images:/dir, or none "
            '(no data on the coordinator: needs evaluation.on = "participants")',
        ),
        "partition": Field(
            "choice", "iid", "how digits:K/N shards split the training data", choices=PARTITIONS
        ),
        "seed": Field("int", 0, "seed of the split and the partition", 0, 2**31 - 1),
        "features": Field(
            "choice",
            "standardize",
            "standardize (training-split mean/std), scale16 (pixels/16), none",
            choices=FEATURES,
        ),
        "alpha": Field("float", 0.5, "Dirichlet concentration (partition = dirichlet)", 1e-3, 1e6),
        "labels_per_part": Field("int", 2, "classes per shard (partition = label_skew)", 1, 1000),
        # The schema every node's data must match (fednode/data.py checks it at load).
        "label": Field(
            "text", "", 'tables: the label column; "" = the last column', hi=MAX_NAME_CHARS
        ),
        "columns": Field(
            "text_list",
            [],
            "tables: the feature columns, in the model's input order; [] = every column but "
            "the label and a split column, in the file's order",
            hi=MAX_NAME_CHARS,
        ),
        "classes": Field(
            "class_list",
            [],
            "classification: the label values in order (text or integers; a label's index "
            "here is its class); [] = the labels are class indices 0..model.classes-1",
            hi=MAX_NAME_CHARS,
        ),
        "input_shape": Field(
            "int_list",
            [],
            "images (idx:, images:): [channels, height, width], channels 1 (grey) or 3 (RGB); "
            "[] = model.input_shape when it is one, else as stored (every image alike)",
            1,
            65_536,
        ),
        "resize": Field(
            "bool", False, "images: resize to input_shape (else a differing size is refused)"
        ),
        "scale": Field(
            "float",
            1.0,
            "images: pixel values are multiplied by this first (1/255 = 0..1)",
            1e-9,
            1e9,
        ),
        "mean": Field(
            "float_list", [], "images: per-channel mean subtracted after scale; [] = none"
        ),
        "std": Field("float_list", [], "images: per-channel std divided by after mean; [] = none"),
        "test_fraction": Field(
            "float",
            0.2,
            "a participant's seeded local held-out split (the idx t10k files or a table's "
            "split column instead, when present)",
            0.0,
            0.9,
        ),
    },
    "model": {
        "kind": Field(
            "choice",
            "mlp",
            "the model's layout: mlp and logreg from inputs, hidden and classes; layers "
            "from input_shape and layers",
            registry=modelspec.KINDS,
        ),
        "task": Field(
            "choice",
            "classification",
            "what the model learns: classification (cross-entropy over >= 2 outputs; "
            "accuracy), binary (BCE with logits on 1 output; accuracy, ROC AUC), regression "
            "(mean squared error on float targets; MAE, R²)",
            choices=modelspec.TASKS,
        ),
        "inputs": Field(
            "int", 64, "input features (layers: derived, prod(input_shape))", 1, 1_000_000
        ),
        "hidden": Field("int_list", [128, 128], "hidden layer widths (mlp)", 1, 65_536),
        "classes": Field(
            "int",
            10,
            "output classes (layers: derived: the last layer's outputs; binary: 2)",
            # 1: a regression's single output, as a validated spec derives it (a spec must
            # validate again on the coordinator); model.task refuses 1 for classification
            1,
            100_000,
        ),
        "input_shape": Field(
            "int_list",
            [],
            "layers and python: one example's shape: [features], [channels, length] or "
            "[channels, height, width]",
            1,
            layers.MAX_DIM,
        ),
        "layers": Field(
            "layers",
            [],
            "layers: the model, in order; each a table: type (the torch.nn class in lower "
            "case: " + ", ".join(layers.TYPES) + ") and its keyword arguments, e.g. "
            '{ type = "linear", out_features = 10 }; input sizes are inferred',
        ),
        "factory": Field(
            "factory",
            "",
            'python: the model\'s factory, "package.module:function", built only on a node '
            "whose operator allowed it (fednode run --allow-model, or a fednode.models entry "
            "point)",
        ),
        "args": Field(
            "kwargs",
            {},
            "python: the factory's keyword arguments (numbers, bools, strings, flat lists)",
        ),
        "fingerprint": Field(
            "fingerprint",
            {},
            'python: every tensor that travels, { "name" = ["dtype", [dims]], ... }, as '
            "`fednode fingerprint FACTORY --args JSON` prints it; every node compares its "
            "build with it",
        ),
        "seed": Field("int", 0, "torch seed of the initial model", 0, 2**31 - 1),
        "fetch": Field(
            "choice",
            "coordinator",
            "where participants fetch each round's model: from the coordinator, or from ipfs "
            "(their own daemon, fednode run --ipfs-api; else from the coordinator)",
            choices=("coordinator", "ipfs"),
        ),
    },
    "training": {
        "local_epochs": Field("int", 2, "epochs over local data per round", 1, 1000),
        "batch_size": Field("int", 32, "minibatch size", 1, 65_536),
        "lr": Field("float", 0.05, "learning rate", 1e-9, 10.0),
        "optimizer": Field("choice", "sgd", "sgd or adam", choices=("sgd", "adam")),
        "momentum": Field("float", 0.9, "SGD momentum, 0 for plain SGD", 0.0, 0.999),
        "weight_decay": Field("float", 0.0, "L2 penalty", 0.0, 1.0),
    },
    "aggregation": {
        "strategy": Field(
            "choice",
            "fedavg",
            "how updates are combined (docs/strategies.md): fedavg (the weighted mean); "
            "fedprox (fedavg's mean, local training pulled toward the round's model by "
            "proximal_mu); fedavgm (server momentum: server_lr, server_momentum); fedadam, "
            "fedyogi, fedadagrad (adaptive server steps: server_lr, beta1, beta2, tau); "
            "median (coordinate-wise); trimmed_mean (beta); krum, multikrum (num_malicious, "
            "num_selected); bulyan (num_malicious, num_selected). The last five need every "
            "update: not with secure = true",
            registry=plugins.STRATEGIES,
        ),
        "proximal_mu": Field(
            "float",
            0.01,
            "fedprox: weight mu of the proximal term (mu/2)·|w - g|² each participant adds to "
            "its training loss; larger keeps local models nearer the round's model",
            0.0,
            100.0,
        ),
        "server_lr": Field(
            "float",
            0.0,
            "fedavgm, fedadam, fedyogi, fedadagrad: the server's learning rate on the "
            "round's pseudo-gradient; mode = async: FedBuff's step on the buffer's weighted "
            "mean delta; 0 = the default (fedavgm 1, fedadam 0.1, fedyogi 0.01, fedadagrad "
            "0.1, async 1 = the plain mean)",
            0.0,
            10.0,
        ),
        "server_momentum": Field(
            "float",
            0.9,
            "fedavgm: momentum of the server's velocity (0 = no momentum: with server_lr 1, "
            "fedavg)",
            0.0,
            0.999,
        ),
        "beta1": Field(
            "float",
            0.9,
            "fedadam, fedyogi: decay of the first moment (the mean of the pseudo-gradients); "
            "fedadagrad has none",
            0.0,
            0.9999,
        ),
        "beta2": Field(
            "float",
            0.99,
            "fedadam, fedyogi: decay of the second moment (the mean of their squares)",
            0.0,
            0.99999,
        ),
        "tau": Field(
            "float",
            0.0,
            "fedadam, fedyogi, fedadagrad: the adaptivity floor added to the second moment's "
            "root (larger: steps less adaptive); 0 = the strategy's default (fedyogi 1e-3, "
            "the others 1e-9)",
            0.0,
            10.0,
        ),
        "beta": Field(
            "float",
            0.2,
            "trimmed_mean: the fraction of values cut from EACH end in every coordinate "
            "(below 0.5; int(beta·n) of the n updates each side)",
            0.0,
            0.5,
        ),
        "num_malicious": Field(
            "int",
            1,
            "krum, multikrum, bulyan: f, the most Byzantine participants a round tolerates; "
            "krum and multikrum need min_participants >= 2f + 3, bulyan >= 4f + 3",
            0,
            10_000,
        ),
        "num_selected": Field(
            "int",
            0,
            "multikrum: how many updates of lowest Krum score are averaged (0 = n - "
            "num_malicious); bulyan: how many Krum selects before the trimmed step (0 = n - "
            "2·num_malicious); krum: must be 0 (one update)",
            0,
            10_000,
        ),
        "secure": Field(
            "bool", False, "secure aggregation: the coordinator learns only the sum (SecAgg)"
        ),
        "threshold": Field(
            "float", 0.6, "secure: fraction of a secret's holders needed to unmask", 0.01, 1.0
        ),
        "neighbours": Field(
            "neighbours", "all", 'secure: "all" (SecAgg) or an even k >= 2 (SecAgg+, k-regular)'
        ),
        "clip": Field(
            "float",
            secagg.DEFAULT_CLIP,
            "secure: each coordinate of a participant's update (trained model minus the "
            "round's model) is clipped to [-clip, clip]; larger costs fraction bits",
            1e-3,
            1e6,
        ),
        "bits": Field(
            "int",
            secagg.DEFAULT_BITS,
            "secure: arithmetic modulo 2^bits; a masked value travels in ceil(bits/8) bytes; "
            "bits, clip and max_weight must leave >= 8 fraction bits for the participants",
            32,
            64,
        ),
        "weighting": Field(
            "choice",
            "examples",
            "how participants weigh in the aggregate: by their example counts (each count at "
            "most what the participant registered for the session, and max_examples), or "
            "uniform (every participant alike)",
            choices=("examples", "uniform"),
        ),
        "max_examples": Field(
            "int",
            0,
            "the most examples one participant's weight may count; 0 = no cap beyond what it "
            "registered",
            0,
            2**40,
        ),
        "max_weight_share": Field(
            "float",
            0.5,
            "no participant's share of the aggregate may exceed this (what it loses goes to the "
            "others in proportion); below 1/participants every participant weighs the same",
            0.01,
            1.0,
        ),
        "max_update_norm": Field(
            "float",
            10.0,
            "each update (trained model minus the round's model) is scaled down to at most this "
            "L2 norm before it is aggregated (secure: by the participant, and the unmasked mean "
            "is checked against it); 0 = no bound",
            0.0,
            1e6,
        ),
        "max_loss_factor": Field(
            "float",
            3.0,
            "a new aggregate whose validation loss is over this factor times the current "
            "model's (or not finite) is rejected, not published; 0 = only the finite check",
            0.0,
            1e6,
        ),
        "max_weight": Field(
            "int",
            secagg.MAX_WEIGHT,
            "secure: the most examples one participant's weight may claim (a larger count is "
            "clamped); smaller leaves more fixed-point bits, so a smaller bits and fewer bytes",
            1,
            2**30,
        ),
        # Asynchronous aggregation, FedBuff (fednode/fedbuff.py, docs/strategies.md)
        "mode": Field(
            "choice",
            "sync",
            "sync: each round waits for its selected participants; async: FedBuff, "
            "participants train on the current version and answer when done, a new version "
            "every buffer_size updates (rounds then counts versions); not with secure = "
            "true, central_dp, or a strategy other than fedavg and fedprox",
            choices=("sync", "async"),
        ),
        "buffer_size": Field(
            "int", 3, "async: K, the updates each new model version aggregates", 1, 10_000
        ),
        "max_staleness": Field(
            "int",
            10,
            "async: an update trained on a model more than this many versions old is refused "
            "(TOO_STALE)",
            0,
            100_000,
        ),
        "staleness": Field(
            "choice",
            "polynomial",
            "async: how an update's staleness s (versions since its model) weighs it: "
            "polynomial = (1 + s)^-staleness_exponent (FedBuff), constant = 1",
            choices=("polynomial", "constant"),
        ),
        "staleness_exponent": Field(
            "float", 0.5, "async, staleness = polynomial: the exponent a of (1 + s)^-a", 0.0, 10.0
        ),
        "concurrency": Field(
            "int",
            0,
            "async: how many participants train at once (the rest wait their turn); 0 = "
            "every eligible participant",
            0,
            10_000,
        ),
    },
    "compression": {
        "codec": Field(
            "choice",
            plugins.IDENTITY_CODEC,
            "how a participant's update crosses the wire (docs/compression.md): identity "
            "(the trained weights as float32 safetensors); fp16, bf16 (the update in 16 bits); "
            "quantize (bits, chunk; stochastic rounding); topk (fraction: the largest "
            'coordinates); topk_quantize, also spelt "topk+quantize" (top-k, then its values '
            "quantised); randk (fraction: coordinates drawn from the round's shared seed, the "
            "only compressing codec secure = true can sum). Every codec but identity sends the "
            "update's difference from the round's model",
            registry=plugins.CODECS,
        ),
        "fraction": Field(
            "float",
            0.01,
            "topk, topk_quantize, randk: the share of the model's coordinates sent each round",
            1e-6,
            1.0,
        ),
        "bits": Field("int", 8, "quantize, topk_quantize: bits per value, 8, 4 or 2", 2, 8),
        "chunk": Field(
            "int",
            0,
            "quantize, topk_quantize: values sharing one scale (0 = one scale per tensor)",
            0,
            2**24,
        ),
        "error_feedback": Field(
            "bool",
            True,
            "lossy codecs: what a round did not send is kept by the participant (in its data "
            "folder, surviving a restart) and added to its next update",
        ),
        "downlink": Field(
            "choice",
            "delta",
            "how a participant downloads the round's model: full (every block); delta (the "
            "difference from the model it holds, when smaller; lossless, checked against the "
            "model's CID); delta_fp16 (that difference in 16 bits: half the bytes, and the "
            "model it rebuilds is checked against the CID the coordinator names for it)",
            choices=("full", "delta", "delta_fp16"),
        ),
    },
    "privacy": {
        "mode": Field(
            "choice",
            plugins.NO_PRIVACY,
            "differential privacy (docs/privacy.md): none; local_dp = DP-SGD on every "
            "participant (Opacus: per-example clipping to max_grad_norm, Gaussian noise), "
            "accounted per participant; central_dp = DP-FedAvg: each update's norm clipped "
            "to clip_norm, Gaussian noise added to the aggregate (with secure = true: each "
            "participant adds its share of the noise)",
            registry=plugins.PRIVACY,
        ),
        "target_epsilon": Field(
            "float",
            3.0,
            "the ε the session may spend over its planned rounds (record-level, per "
            "participant for local_dp); the noise multiplier is derived from it unless "
            "noise_multiplier is given",
            0.01,
            1000.0,
        ),
        "delta": Field("float", 1e-5, "the δ of (ε, δ)-DP", 1e-12, 0.1),
        "noise_multiplier": Field(
            "float",
            0.0,
            "σ: the noise's standard deviation over the clipping norm; 0 = derived from "
            "target_epsilon, delta and the planned rounds by the accountant",
            0.0,
            100.0,
        ),
        "max_grad_norm": Field(
            "float", 1.0, "local_dp: each example's gradient is clipped to this L2 norm", 1e-4, 1e4
        ),
        "accountant": Field(
            "choice",
            "rdp",
            "how ε is accounted: rdp (Rényi DP) or prv (privacy random variables), Opacus's own",
            choices=("rdp", "prv"),
        ),
        "clip_norm": Field(
            "float",
            1.0,
            "central_dp: each update (trained model minus the round's model) is scaled down to "
            "at most this L2 norm before the noisy sum",
            1e-4,
            1e4,
        ),
        "noisy_reports": Field(
            "bool",
            False,
            "what a participant reports about its data (label counts, data-quality figures) "
            "is released with calibrated noise",
        ),
        "report_epsilon": Field(
            "float",
            1.0,
            "noisy_reports: the ε of each noisy report (Laplace mechanism)",
            0.01,
            100.0,
        ),
    },
    "robustness": {
        "detection": Field(
            "choice",
            "auto",
            "each plain round's updates are scored (norm, cosine to the coordinate-wise "
            "median update, modified z-score of the distance to it): exclude = an outlier is "
            "left out of the aggregate; alert = scored and recorded only; off; auto = exclude, "
            "or off with aggregation.secure = true (secure rounds hide single updates), alert "
            'with privacy.mode = "central_dp" (exclude is refused there: docs/privacy.md)',
            choices=("auto", "exclude", "alert", "off"),
        ),
        "min_updates": Field(
            "int",
            4,
            "rounds with fewer plain updates are not judged (a median of fewer says little)",
            3,
            10_000,
        ),
        "max_z": Field(
            "float",
            3.5,
            "an update whose distance to the median update has a modified z-score above this "
            "is an outlier (Iglewicz and Hoaglin's 3.5)",
            0.5,
            1e6,
        ),
        "min_cosine": Field(
            "float",
            0.0,
            "an update pointing away from the median update (cosine below this) is an outlier",
            -1.0,
            1.0,
        ),
        "max_norm_ratio": Field(
            "float",
            4.0,
            "an update longer than this many times the median update norm is an outlier",
            1.0,
            1e6,
        ),
        "min_norm_ratio": Field(
            "float",
            0.05,
            "an update shorter than this fraction of the median norm is an outlier (a free "
            "rider sending the round's model back); 0 = no lower bound",
            0.0,
            1.0,
        ),
        "quarantine_after": Field(
            "int",
            3,
            "a peer excluded in this many of its last quarantine_window judged rounds is "
            "quarantined: a critical alert, no selection until an operator acknowledges it; "
            "0 = never",
            0,
            1000,
        ),
        "quarantine_window": Field(
            "int", 5, "how many of a peer's latest judged rounds quarantine_after counts", 1, 1000
        ),
    },
    "rollback": {
        "enabled": Field(
            "bool",
            True,
            "go back to the best model so far when the global model diverges: non-finite "
            "weights, or accuracy more than margin below the best for `rounds` rounds in a row",
        ),
        "margin": Field(
            "float",
            0.05,
            "accuracy fall, as a fraction (0.05 = 5 points), below the best so far that "
            "counts as diverging",
            0.001,
            1.0,
        ),
        "rounds": Field(
            "int", 2, "consecutive rounds below the margin before rolling back", 1, 1000
        ),
    },
    "evaluation": {
        "on": Field(
            "choice",
            "coordinator",
            "where each round's model is evaluated: coordinator (on data.dataset), "
            "participants (each on a held-out split of its own data, reported with its "
            'update; the coordinator needs no data: data.dataset = "none") or both',
            choices=EVALUATION_PLACES,
        ),
    },
    # Who trains each round among the eligible participants (fednode.rounds.plan_selection,
    # sample; docs/architecture.md, "Sampling participants").
    "selection": {
        "fraction": Field(
            "float",
            0.0,
            "the share of the eligible participants each round needs: ceil(fraction x "
            "eligible), at least min_participants, at most max_participants when set; "
            "0 = not used (max_participants, else every eligible participant)",
            0.0,
            1.0,
        ),
        "method": Field(
            "choice",
            "first",
            "how they are picked: first (in the order they came online); random (uniform, "
            "drawn from seed and the round number: a session's draws are reproducible); "
            "quality (without replacement, weighted by each peer's latest overall quality "
            f"score, at least {selection.QUALITY_FLOOR:g} so that every peer may be picked, "
            f"{selection.QUALITY_UNSCORED:g} for a peer not scored yet; not with central_dp)",
            choices=selection.METHODS,
        ),
        "seed": Field("int", 0, "method = random or quality: the seed of the draws", 0, 2**31 - 1),
        "over_selection": Field(
            "float",
            0.0,
            "stragglers: ask ceil(needed x (1 + over_selection)) participants and close the "
            "round as soon as the needed count of updates has arrived; the others are told "
            "the round ended and recorded as not needed (not dropped, not failed). 0 = off",
            0.0,
            10.0,
        ),
    },
}


def _where(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _check(section: str, key: str, f: Field, value: Any) -> Any:
    where = _where(section, key)

    def bad(accepted: str) -> SpecError:
        return SpecError(
            f"{where} = {value!r} is not accepted: expected {accepted}",
            hint=f"{f.doc}; fix {where} in the spec",
        )

    def in_range(v: float) -> None:
        if (f.lo is not None and v < f.lo) or (f.hi is not None and v > f.hi):
            raise bad(f"a value in [{_num(f.lo)}, {_num(f.hi)}]")

    if f.kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("an integer")
        in_range(value)
        return value
    if f.kind == "float":
        if not isinstance(value, int | float) or isinstance(value, bool) or value != value:
            raise bad("a number")
        in_range(float(value))
        return float(value)
    if f.kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if f.kind == "choice":
        if value not in f.accepted():
            raise bad("one of " + ", ".join(f.accepted()))
        return value
    if f.kind == "name":
        if not isinstance(value, str) or not _NAME_RE.match(value):
            raise bad("1-100 characters: letters, digits, _ . - (starting with a letter or digit)")
        return value
    if f.kind == "dataset":
        kinds = "|".join(EVAL_SOURCES)
        ok = isinstance(value, str) and (
            value in ("digits", NO_DATASET) or re.match(rf"^({kinds}):.+", value) is not None
        )
        if not ok:
            raise bad(
                "digits, " + ", ".join(f"{k}:/path" for k in EVAL_SOURCES) + f" or {NO_DATASET}"
            )
        return value
    if f.kind == "text":
        if not isinstance(value, str) or len(value) > (f.hi or MAX_NAME_CHARS):
            raise bad(f"a string of at most {_num(f.hi)} characters")
        return value
    if f.kind in ("text_list", "class_list"):
        return _check_names(f, value, bad)
    if f.kind == "float_list":
        if (
            not isinstance(value, list)
            or len(value) > 16
            or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in value
            )
        ):
            raise bad("a list of at most 16 finite numbers")
        return [float(v) for v in value]
    if f.kind == "int_list":
        if (
            not isinstance(value, list)
            or len(value) > 16
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise bad("a list of at most 16 integers")
        for v in value:
            in_range(v)
        return list(value)
    if f.kind == "layers":
        ok = isinstance(value, list) and len(value) <= layers.MAX_LAYERS
        if not ok or not all(isinstance(v, dict) for v in value):
            raise bad(f"a list of at most {layers.MAX_LAYERS} tables, one per layer")
        return copy.deepcopy(value)
    if f.kind in ("factory", "kwargs", "fingerprint"):
        check = {
            "factory": fingerprint.check_factory,
            "kwargs": fingerprint.check_args,
            "fingerprint": lambda v, w: fingerprint.to_spec(fingerprint.parse(v, w)),
        }[f.kind]
        if f.kind == "factory" and value == "":
            return value
        try:
            return check(value, where)
        except ValidationError as exc:
            raise SpecError(exc.message, hint=exc.hint) from None
    if f.kind == "neighbours":
        ok = value == "all" or (
            isinstance(value, int)
            and not isinstance(value, bool)
            and 2 <= value <= 10_000
            and value % 2 == 0
        )
        if not ok:
            raise bad('"all" or an even integer in [2, 10000]')
        return value
    if f.kind == "peer_list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of peer IDs (12D3KooW…)")
        for v in value:
            try:
                public_key_from_peer_id(v)
            except IdentityError as exc:
                raise SpecError(f"{where}: {exc.message}", hint=exc.hint) from None
        return list(value)
    raise AssertionError(f.kind)


def _check_names(f: Field, value: Any, bad: Any) -> list[Any]:
    """A schema list of column names (text_list) or class values (class_list): bounded,
    each entry short, no two alike as compared (class_text)."""
    texts_only = f.kind == "text_list"

    def item_ok(v: Any) -> bool:
        if texts_only:
            return isinstance(v, str)
        return isinstance(v, str | int) and not isinstance(v, bool)

    limit = int(f.hi or MAX_NAME_CHARS)
    what = "strings" if texts_only else "strings or integers"
    if (
        not isinstance(value, list)
        or len(value) > MAX_LIST
        or not all(item_ok(v) and len(str(v)) <= limit for v in value)
    ):
        raise bad(f"a list of at most {MAX_LIST} {what} (each at most {limit} characters)")
    keys = [class_text(v) for v in value]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise bad(f"distinct values ({dup!r} appears twice)")
    return list(value)


def class_text(value: Any) -> str:
    """A label value as the text it is compared by: every node maps labels to classes the
    same way, whether a file stores 3, 3.0 or "3" (all "3"), so a CSV's text and a parquet
    file's integers agree with the spec's `classes`."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value).strip()


def defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, fields in SCHEMA.items():
        target = out if not section else out.setdefault(section, {})
        for key, f in fields.items():
            target[key] = copy.deepcopy(f.default)
    return out


def validate(raw: Any) -> dict[str, Any]:
    """A complete, checked spec (missing fields take their defaults)."""
    if not isinstance(raw, dict):
        raise SpecError("a session spec must be a table (TOML) or an object (JSON)")
    out = defaults()
    sections = {s for s in SCHEMA if s}
    raw = _legacy(raw)
    for key, value in raw.items():
        if key in sections:
            if not isinstance(value, dict):
                raise SpecError(f"[{key}] must be a table", hint="see `fedctl session init`")
            for sub, subvalue in value.items():
                f = SCHEMA[key].get(sub)
                if f is None:
                    raise SpecError(
                        f"unknown field {key}.{sub}",
                        hint=f"fields of [{key}]: " + ", ".join(SCHEMA[key]),
                    )
                out[key][sub] = _check(key, sub, f, subvalue)
        elif key in SCHEMA[""]:
            out[key] = _check("", key, SCHEMA[""][key], value)
        else:
            raise SpecError(
                f"unknown field {key!r}",
                hint="top-level fields: "
                + ", ".join(SCHEMA[""])
                + "; sections: "
                + ", ".join(sorted(sections)),
            )
    _check_model(out["model"], raw.get("model") or {})
    _check_compression(out, raw.get("compression") or {})
    _check_robustness(out)
    _cross_checks(out)
    return out


def _legacy(raw: dict[str, Any]) -> dict[str, Any]:
    """A spec as today's schema reads it: ``aggregation.codec`` (before [compression]
    existed, always "identity" in stored specs) becomes ``compression.codec``, and
    "topk+quantize" is the registered name topk_quantize (plug-in names have no "+")."""
    agg, comp = raw.get("aggregation"), raw.get("compression")
    if isinstance(agg, dict) and "codec" in agg:
        if isinstance(comp, dict) and "codec" in comp:
            raise SpecError(
                "both aggregation.codec and compression.codec are set",
                hint="keep compression.codec (aggregation.codec is its old place)",
            )
        agg = {k: v for k, v in agg.items() if k != "codec"}
        comp = {**(comp if isinstance(comp, dict) else {}), "codec": raw["aggregation"]["codec"]}
        raw = {**raw, "aggregation": agg, "compression": comp}
    if isinstance(comp, dict) and comp.get("codec") == "topk+quantize":
        raw = {**raw, "compression": {**comp, "codec": plugins.TOPK_QUANTIZE}}
    return raw


def _check_compression(spec: dict[str, Any], given: dict[str, Any]) -> None:
    """A codec's settings make sense for it, and secure aggregation can sum what it sends."""
    comp = spec["compression"]
    info = plugins.CODECS.get(comp["codec"])
    unread = set(given) - {"codec", "downlink"} - set(info.settings)
    # set to another value than its default: a template lists every field at its default
    for key in sorted(k for k in unread if comp[k] != SCHEMA["compression"][k].default):
        raise SpecError(
            f"compression.{key} is set, but codec {comp['codec']!r} does not read it",
            hint=f"codec {comp['codec']!r} reads: "
            + (", ".join(info.settings) or "no setting")
            + f"; remove compression.{key} or choose a codec that uses it",
        )
    if comp["bits"] not in (2, 4, 8):
        raise SpecError(
            f"compression.bits = {comp['bits']} is not accepted: expected 8, 4 or 2",
            hint="values are packed whole into bytes",
        )
    if spec["aggregation"]["secure"] and not info.secure:
        able = [n for n in plugins.CODECS if plugins.CODECS.get(n).secure]
        raise SpecError(
            f'compression.codec = "{comp["codec"]}" with aggregation.secure = true: each '
            "participant would send other coordinates or scales, and masked vectors only sum "
            "coordinate by coordinate in one fixed-point scale",
            hint=f"use {' or '.join(able)} (randk: every participant keeps the coordinates "
            "drawn from the round's shared seed), or secure = false",
        )


def _check_model(model: dict[str, Any], given: dict[str, Any]) -> None:
    """The model's layers, checked by arithmetic (protocol.modelspec), and its output against
    the task. For kind "layers", model.inputs and model.classes are derived (prod(input_shape);
    the last layer's outputs, 2 for binary), and a value given for either must agree."""
    declared = model["kind"] == "layers"
    if model["kind"] == fingerprint.PYTHON_KIND:
        _check_python_model(model, given)
        return
    for key in ("factory", "args", "fingerprint"):
        if model[key]:
            raise SpecError(
                f"model.{key} is set but model.kind = {model['kind']!r}",
                hint=f'set model.kind = "python" to build the model from a factory, or remove '
                f"model.{key}",
            )
    for key in ("input_shape", "layers"):
        if model[key] and not declared:
            raise SpecError(
                f"model.{key} is set but model.kind = {model['kind']!r}",
                hint=f'set model.kind = "layers" to declare the model, or remove model.{key}',
            )
    if declared and not model["input_shape"]:
        raise SpecError(
            'model.kind = "layers" needs model.input_shape',
            hint="e.g. input_shape = [1, 28, 28] for grey 28x28 images, [64] for 64 features",
        )
    try:
        task = modelspec.check_task({k: model[k] for k in modelspec.MODEL_KEYS})
        if not declared:
            return
        derived = {
            "inputs": math.prod(modelspec.input_shape(model)),
            "classes": 2 if task == "binary" else modelspec.output_width(model),
        }
    except ValidationError as exc:
        raise SpecError(exc.message, hint=exc.hint) from None
    for key, value in derived.items():
        if key in given and given[key] != value:
            raise SpecError(
                f"model.{key} = {given[key]!r} but the declared layers give {value}",
                hint=f"leave model.{key} out for kind layers (it is derived), or set it to {value}",
            )
        model[key] = value


def _check_python_model(model: dict[str, Any], given: dict[str, Any]) -> None:
    """kind "python": a factory, its fingerprint and input_shape, no declared layers;
    model.inputs is derived (prod(input_shape)), binary has 2 classes."""
    needs = {
        "factory": 'e.g. factory = "mypkg.nets:small"',
        "fingerprint": "print it with `fednode fingerprint FACTORY --args JSON` and paste it",
        "input_shape": "e.g. input_shape = [1, 8, 8] for 8x8 grey images, [64] for 64 features",
    }
    for key, hint in needs.items():
        if not model[key]:
            raise SpecError(f'model.kind = "python" needs model.{key}', hint=hint)
    if model["layers"]:
        raise SpecError(
            'model.layers is set but model.kind = "python" (the factory builds the model)',
            hint='remove model.layers, or use model.kind = "layers"',
        )
    inputs = math.prod(model["input_shape"])
    if "inputs" in given and given["inputs"] != inputs:
        raise SpecError(
            f"model.inputs = {given['inputs']!r} but model.input_shape gives {inputs}",
            hint="leave model.inputs out for kind python (it is derived)",
        )
    model["inputs"] = inputs
    if model["task"] == "binary":
        model["classes"] = 2


def detection_mode(spec: dict[str, Any]) -> str:
    """What outlier detection does in a validated spec's sessions: ``robustness.detection``
    with ``auto`` resolved (exclude; off when aggregation.secure = true; alert with
    privacy.mode = "central_dp", where leaving an update out would depend on the others)."""
    mode = str(spec["robustness"]["detection"])
    if mode == "auto":
        # async: a buffer's updates were trained on different versions; no median to judge by
        if spec["aggregation"]["secure"] or spec["aggregation"].get("mode") == "async":
            return "off"
        central = spec.get("privacy", {}).get("mode") == plugins.CENTRAL_DP
        return "alert" if central else "exclude"
    return mode


def _check_robustness(spec: dict[str, Any]) -> None:
    """Outlier detection reads single updates, which a secure round never shows the
    coordinator: asking for it in a secure session is refused (``auto``, the default, is
    off there). ``auto`` stays in the spec, so a checked spec can be changed (say to
    secure = true) and checked again."""
    rob = spec["robustness"]
    if spec["aggregation"]["secure"] and rob["detection"] not in ("auto", "off"):
        raise SpecError(
            f'robustness.detection = "{rob["detection"]}" with aggregation.secure = true: '
            "secure aggregation shows the coordinator only the sum of the updates, never "
            "one update to score",
            hint='set robustness.detection = "auto" or "off" (aggregation.max_update_norm, '
            "which each participant applies before masking, stays the defence), or "
            "secure = false",
        )
    if rob["quarantine_after"] > rob["quarantine_window"]:
        raise SpecError(
            f"robustness.quarantine_after = {rob['quarantine_after']} is more than "
            f"robustness.quarantine_window = {rob['quarantine_window']}: no peer could ever "
            "be quarantined",
            hint="lower quarantine_after, raise quarantine_window, or set quarantine_after = 0",
        )


def _cross_checks(spec: dict[str, Any]) -> None:
    mx, mn = spec["max_participants"], spec["min_participants"]
    if mx and mx < mn:
        raise SpecError(
            f"max_participants = {mx} is below min_participants = {mn}",
            hint="raise max_participants, or set it to 0 (all online)",
        )
    agg = spec["aggregation"]
    if agg["secure"] and not plugins.STRATEGIES.get(agg["strategy"]).supports_secure:
        able = [n for n in plugins.STRATEGIES if plugins.STRATEGIES.get(n).supports_secure]
        raise SpecError(
            f"aggregation.secure = true cannot compute strategy {agg['strategy']!r}",
            hint="the coordinator only sees the sum of the updates; use a strategy computed "
            f"from their weighted mean ({', '.join(able)}) or secure = false",
        )
    if agg["secure"]:
        _check_fixed_point(spec)
    _check_robust_strategy(spec)
    if 0 < agg["max_loss_factor"] < 1:
        raise SpecError(
            f"aggregation.max_loss_factor = {agg['max_loss_factor']:g} would reject every "
            "aggregate that does not lower the loss",
            hint="use 0 (off) or a factor >= 1 (the default 3 rejects a loss that triples)",
        )
    if spec["model"]["kind"] == "mlp" and not spec["model"]["hidden"]:
        raise SpecError(
            "model.hidden = [] leaves the mlp with no hidden layer",
            hint='give at least one width, or use model.kind = "logreg"',
        )
    on = spec["evaluation"]["on"]
    if on != "participants" and spec["data"]["dataset"] == NO_DATASET:
        raise SpecError(
            f'evaluation.on = "{on}" with data.dataset = "{NO_DATASET}": the coordinator would '
            "evaluate each round's model on data it does not have",
            hint='set evaluation.on = "participants" (each participant evaluates on a held-out '
            "split of its own data), or give the coordinator data.dataset",
        )
    _check_model_size(spec)
    _check_data_schema(spec)
    _check_local_dp_layers(spec)
    _check_central_dp(spec)
    _check_async(spec)
    _check_selection(spec)


def _check_selection(spec: dict[str, Any]) -> None:
    """[selection] against the privacy and aggregation it serves."""
    sel = spec["selection"]
    if sel["method"] == "quality" and spec["privacy"]["mode"] == plugins.CENTRAL_DP:
        raise SpecError(
            'selection.method = "quality" with privacy.mode = "central_dp": the DP-FedAvg '
            "accountant assumes each round is a uniform sample of the eligible participants "
            "(sample rate q = selected / eligible); weighting by quality scores breaks that, "
            "and the ε it reports would not hold",
            hint='use selection.method = "random" or "first" (both uniform under central_dp), '
            "or another privacy.mode",
        )
    if sel["over_selection"] > 0 and spec["aggregation"]["secure"]:
        raise SpecError(
            f"selection.over_selection = {sel['over_selection']:g} with aggregation.secure = "
            "true: secure aggregation fixes its roster when the keys are exchanged and waits "
            "for every member at each stage; cutting the round at the needed count would "
            "make every extra participant a dropout whose masks must be unmasked from the "
            "others' shares, which costs more than the straggler it saves",
            hint="set selection.over_selection = 0 with secure = true (a straggler is then a "
            "dropout at round_timeout_s), or secure = false",
        )


# What asynchronous aggregation (FedBuff) cannot run with, each with its reason.
ASYNC_STRATEGIES = ("fedavg", "fedprox")


def _check_async(spec: dict[str, Any]) -> None:
    """aggregation.mode = "async" (FedBuff, fednode/fedbuff.py): the coordinator applies
    updates as they arrive, trained on different model versions, so whatever needs one
    synchronized cohort trained on one model is refused, with its reason."""
    agg = spec["aggregation"]
    if agg["mode"] != "async":
        return
    why: tuple[str, str] | None = None
    if agg["secure"]:
        why = (
            "aggregation.secure = true: secure aggregation masks the inputs of one "
            "synchronized cohort (every selected participant's pairwise masks cancel only in "
            "their sum), while async aggregates whichever K updates arrive",
            'set mode = "sync" to keep secure = true, or secure = false',
        )
    elif agg["strategy"] not in ASYNC_STRATEGIES:
        why = (
            f'aggregation.strategy = "{agg["strategy"]}": FedBuff\'s own server step '
            "(server_lr on the buffer's staleness-weighted mean delta) takes the strategy's "
            "place, and the robust strategies compare updates trained on the same model",
            f'use strategy {" or ".join(ASYNC_STRATEGIES)}, or mode = "sync"',
        )
    elif spec["privacy"]["mode"] == plugins.CENTRAL_DP:
        why = (
            'privacy.mode = "central_dp": its accountant assumes each noisy aggregate is one '
            "uniformly sampled cohort's clipped mean, which a buffer of updates of different "
            "staleness is not",
            'use privacy.mode = "local_dp" (each participant\'s own DP-SGD works in async), '
            'or mode = "sync"',
        )
    elif spec["robustness"]["detection"] in ("exclude", "alert"):
        why = (
            f'robustness.detection = "{spec["robustness"]["detection"]}": outlier detection '
            "compares each update with the round's median update, and a buffer's updates were "
            "trained on different model versions",
            'set robustness.detection = "auto" or "off" (the norm bound max_update_norm and '
            "the share cap still apply to every update)",
        )
    elif spec["evaluation"]["on"] != "coordinator":
        why = (
            f'evaluation.on = "{spec["evaluation"]["on"]}": a participant reports on the model '
            "it trained from, which in async mode is a different version for each update",
            'set evaluation.on = "coordinator"',
        )
    if why is not None:
        raise SpecError(f'aggregation.mode = "async" with {why[0]}', hint=why[1])


# Layers whose output for one example depends on the others in its batch: per-example
# gradients (DP-SGD) are undefined for them, so Opacus cannot train them privately.
BATCH_MIXING_LAYERS = ("batchnorm1d", "batchnorm2d")


def _check_local_dp_layers(spec: dict[str, Any]) -> None:
    """privacy.mode = "local_dp" with declared BatchNorm layers is refused, with the fix
    (GroupNorm). kinds mlp and logreg have none; a python model is checked by each
    participant (Opacus's ModuleValidator), which declines the task."""
    if spec["privacy"]["mode"] != plugins.LOCAL_DP or spec["model"]["kind"] != "layers":
        return
    for i, layer in enumerate(spec["model"]["layers"]):
        kind = layer.get("type") if isinstance(layer, dict) else None
        if kind in BATCH_MIXING_LAYERS:
            raise SpecError(
                f'model.layers[{i}] is {kind} but privacy.mode = "local_dp": BatchNorm mixes '
                "the examples of a batch, so DP-SGD (Opacus) cannot clip one example's "
                "gradient",
                hint='replace it with {type = "groupnorm", num_groups = G} (G divides the '
                "channels; it normalises each example on its own), or choose another "
                "privacy.mode",
            )


def _check_central_dp(spec: dict[str, Any]) -> None:
    """privacy.mode = "central_dp" (DP-FedAvg, docs/privacy.md): the noise goes on the mean
    of the clipped updates, so the strategy must make the model from that mean alone (as a
    secure round needs), and no update may be left out because of the others (outlier
    exclusion would let one participant move the sum by more than clip_norm)."""
    if spec["privacy"]["mode"] != plugins.CENTRAL_DP:
        return
    name = spec["aggregation"]["strategy"]
    if not plugins.STRATEGIES.get(name).supports_secure:
        able = [n for n in plugins.STRATEGIES if plugins.STRATEGIES.get(n).supports_secure]
        raise SpecError(
            f'aggregation.strategy = "{name}" with privacy.mode = "central_dp": the noise '
            "covers the mean of the clipped updates, and this strategy reads single updates "
            "(which the noise does not protect, and one of which may move it by more than "
            "clip_norm)",
            hint=f"use a strategy computed from the mean ({', '.join(able)}), or another "
            "privacy.mode",
        )
    if spec["robustness"]["detection"] == "exclude":
        raise SpecError(
            'robustness.detection = "exclude" with privacy.mode = "central_dp": whether an '
            "update is left out depends on the other updates, so one participant could "
            "change the sum by more than clip_norm, which the noise is sized for",
            hint='set robustness.detection = "auto" (alert: scored and recorded, never left '
            'out) or "alert" or "off"',
        )


def _check_robust_strategy(spec: dict[str, Any]) -> None:
    """The robust strategies' settings against what every round has: at least
    min_participants updates (fednode/strategies/aggregate.py needs n > 2f + 2 for Krum and
    n >= 4f + 3 for Bulyan, f = num_malicious)."""
    agg, mn = spec["aggregation"], spec["min_participants"]
    name, f, sel = agg["strategy"], agg["num_malicious"], agg["num_selected"]
    if agg["beta"] >= 0.5:
        raise SpecError(
            f"aggregation.beta = {agg['beta']:g} would cut every value: it is the fraction cut "
            "from EACH end",
            hint="use 0 <= beta < 0.5 (0.2 cuts the lowest and the highest fifth)",
        )
    need = {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}.get(name)
    if need is not None and mn < need:
        rule = "4·num_malicious + 3" if name == "bulyan" else "2·num_malicious + 3"
        most = (mn - 3) // (4 if name == "bulyan" else 2)
        fits = f"lower num_malicious to {most}" if most >= 0 else "add participants"
        raise SpecError(
            f"strategy {name!r} with aggregation.num_malicious = {f} needs min_participants >= "
            f"{rule} = {need}, but min_participants = {mn}",
            hint=f"raise min_participants to {need}, or {fits}",
        )
    if name == "krum" and sel:
        raise SpecError(
            f"aggregation.num_selected = {sel} with strategy 'krum', which keeps one update",
            hint=f'set num_selected = 0, or strategy = "multikrum" to average the best {sel}',
        )
    if name == "multikrum" and sel > mn:
        raise SpecError(
            f"aggregation.num_selected = {sel} is more than a round of min_participants = {mn} "
            "may have",
            hint=f"use 0 (n - num_malicious) or at most {mn}",
        )
    if name == "bulyan" and sel and not 2 * f + 1 <= sel <= mn - 2 * f:
        raise SpecError(
            f"aggregation.num_selected = {sel} for bulyan with num_malicious = {f} and "
            f"min_participants = {mn}: Krum must select 2·num_malicious + 1 to min_participants "
            "- 2·num_malicious updates",
            hint=f"use 0 (n - 2·num_malicious) or a number in [{2 * f + 1}, {mn - 2 * f}]",
        )


def _check_data_schema(spec: dict[str, Any]) -> None:
    """The [data] schema against itself and the model: what every node's data must match."""
    data, model = spec["data"], spec["model"]
    shape = data["input_shape"]
    if shape and (len(shape) != 3 or shape[0] not in (1, 3)):
        raise SpecError(
            f"data.input_shape = {shape} is not [channels, height, width] with 1 or 3 channels",
            hint="e.g. [1, 28, 28] for grey MNIST digits, [3, 32, 32] for RGB images",
        )
    for key in ("mean", "std"):
        n = len(data[key])
        if n > 1 and shape and n != shape[0]:
            raise SpecError(
                f"data.{key} has {n} values but data.input_shape has {shape[0]} channel(s)",
                hint="give one value per channel, or one for all",
            )
    if data["mean"] and data["std"] and len(data["mean"]) != len(data["std"]):
        raise SpecError(
            f"data.mean has {len(data['mean'])} values and data.std {len(data['std'])}",
            hint="give both per channel (or one value each)",
        )
    if any(v <= 0 for v in data["std"]):
        raise SpecError(f"data.std = {data['std']} must be > 0", hint="a std of 1 leaves a value")
    task = model.get("task", "classification")
    if task == "regression" and data["classes"]:
        raise SpecError(
            'data.classes is set but model.task = "regression" has no classes',
            hint="remove data.classes (regression labels are numbers)",
        )
    if data["label"] and data["label"] in data["columns"]:
        raise SpecError(
            f"data.label {data['label']!r} is also in data.columns: the model would see the "
            "answer among its inputs",
            hint="remove the label column from data.columns",
        )
    want = 2 if task == "binary" else model["classes"]
    if task != "regression" and data["classes"] and len(data["classes"]) != want:
        raise SpecError(
            f"data.classes lists {len(data['classes'])} values but the model has {want} "
            f"classes (model.task = {task!r}, model.classes = {model['classes']})",
            hint="list one value per class of the model, in order (binary: the 0 and the 1)",
        )


# What a frame around a model's values holds besides them (the safetensors header, the
# envelope's fields and signature); generous, so that a model this check passes is never
# refused by the frame cap it is checked against.
FRAME_OVERHEAD_BYTES = 1024 * 1024


def _check_model_size(spec: dict[str, Any]) -> None:
    """Refuse a model whose values cannot cross the wire: every round moves the model in one
    frame (an update: float32 values; a masked input: ceil(bits / 8) bytes per value), and
    frames are capped (protocol.limits). Counted by arithmetic, so a spec naming a 17 GB
    model costs nothing to refuse."""
    model = spec["model"]
    n = modelspec.param_count({k: model[k] for k in modelspec.MODEL_KEYS})
    per_value = math.ceil(spec["aggregation"]["bits"] / 8) if spec["aggregation"]["secure"] else 4
    frame = min(limits.MAX_BYTES["update"], limits.MAX_BYTES["secagg_masked"])
    most = (frame - FRAME_OVERHEAD_BYTES) // max(per_value, modelspec.F32)
    if n > most:
        what = (
            f"input_shape {model['input_shape']}, {len(model['layers'])} layers"
            if model["kind"] == "layers"
            else f"factory {model['factory']}, {len(model['fingerprint'])} tensors"
            if model["kind"] == fingerprint.PYTHON_KIND
            else f"inputs {model['inputs']}, hidden {model['hidden']}, classes {model['classes']}"
        )
        raise SpecError(
            f"the model (kind {model['kind']}, {what}) has {n:,} parameters; a model "
            f"must fit one {frame // limits.MIB} MiB frame: at most {most:,} parameters",
            hint="use fewer or narrower hidden layers",
        )


def _check_fixed_point(spec: dict[str, Any]) -> None:
    """Refuse bits / clip / max_weight that leave too few fraction bits for the participants.

    The coordinator chooses frac_bits per round for the selected participants; this checks
    the most a round may select (max_participants, else the participants list, else
    SECURE_PARTICIPANTS_BOUND or min_participants if larger), so such a spec fails here
    rather than at its first round.
    """
    agg = spec["aggregation"]
    bits, clip, mw = agg["bits"], agg["clip"], agg["max_weight"]
    if spec["max_participants"]:
        n, why = spec["max_participants"], "max_participants"
    elif spec["participants"]:
        n, why = len(spec["participants"]), "the participants listed"
    else:  # a round takes at least min_participants, so they bound it from below
        n = max(SECURE_PARTICIPANTS_BOUND, spec["min_participants"])
        why = "assumed when max_participants = 0 and no participants are listed"
    n = max(n, 2)
    try:
        secagg.frac_bits_for(bits, clip, mw, n)
    except secagg.SecAggError:
        pass
    else:
        return
    # What would fit, changing one field at a time: n * mw * ceil(clip * 2**8) < 2**(bits-1)
    limit, unit = 1 << (bits - 1), 1 << secagg.MIN_FRAC_BITS
    fixes = []
    more_bits = next(
        (b for b in range(bits + 1, 65) if n * mw * math.ceil(clip * unit) < 1 << (b - 1)), None
    )
    if more_bits:
        fixes.append(f"raise aggregation.bits to {more_bits}")
    max_clip = math.floor(((limit - 1) // (n * mw)) / unit * 1000) / 1000  # rounded down
    if max_clip >= 1e-3:
        fixes.append(f"lower aggregation.clip to {max_clip:g} or less")
    max_mw = (limit - 1) // (n * math.ceil(clip * unit))
    if max_mw >= 1:
        fixes.append(f"lower aggregation.max_weight to {max_mw} or less")
    max_n = (limit - 1) // (mw * math.ceil(clip * unit))
    if max_n >= max(2, spec["min_participants"]):
        fixes.append(f"set max_participants to {max_n} or less")
    raise SpecError(
        f"aggregation.bits = {bits}, aggregation.clip = {clip:g} and aggregation.max_weight = "
        f"{mw} leave fewer than {secagg.MIN_FRAC_BITS} fraction bits for {n} participants "
        f"({why})",
        hint="; or ".join(fixes) if fixes else "raise bits and lower clip and max_weight",
    )


def loads(text: str, *, fmt: str) -> dict[str, Any]:
    try:
        raw = tomllib.loads(text) if fmt == "toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"the spec is not valid {fmt.upper()}: {exc}") from None
    return validate(raw)


def load(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read spec {path}: {exc.strerror}") from None
    return loads(text, fmt="json" if path.suffix.lower() == ".json" else "toml")


def _num(v: float | None) -> str:
    return str(int(v)) if v is not None and float(v).is_integer() else f"{v:g}"


def _toml_value(v: Any) -> str:
    return json.dumps(v)  # ints, floats, bools, strings and lists print as valid TOML


def template() -> str:
    """A complete, commented TOML spec with every field at its default."""
    lines = [
        "# fednode session spec: every field, with its default and what it accepts.",
        "# Validate with `fedctl session create FILE`.",
        "",
    ]
    for section, fields in SCHEMA.items():
        if section:
            lines += ["", f"[{section}]"]
        for key, f in fields.items():
            accepted = (
                " | ".join(f.accepted())
                if f.accepted()
                else f"{_num(f.lo)}..{_num(f.hi)}"
                if f.lo is not None
                else ""
            )
            comment = f.doc + (f" ({accepted})" if accepted else "")
            value = _toml_value(f.default).lower() if f.kind == "bool" else _toml_value(f.default)
            lines.append(f"{f'{key} = {value}':<32} # {comment}")
    return "\n".join(lines) + "\n"
