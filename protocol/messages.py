"""Every message type of protocol version 1, in one place, with validation.

A message is a frozen dataclass; its ``TYPE`` is the envelope type. ``parse(type, payload)``
turns a verified envelope's payload into the typed message or raises ValidationError naming
the field; unknown types and unknown fields are refused (strict, so that a typo on one side
is loud instead of silently ignored). ``payload(msg)`` is the inverse.

Who sends what:
  participant → coordinator : register, heartbeat, fetch, update, task_error
  coordinator → participant : welcome, admitted, block, round_start, round_end, session_end,
                              error
  operator    → coordinator : admin          coordinator → operator : admin_reply, event
  secure aggregation        : secagg_keys, secagg_roster, secagg_shares, secagg_relay,
                              secagg_masked, secagg_unmask_request, secagg_unmask
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar

from protocol import limits, plugins, text
from protocol.errors import ValidationError

MAX_STR = text.MAX_TEXT
MAX_ID = 128


def _check_value(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the type ``hint``, as it is to be kept: every string in it
    cleaned (protocol.text.clean). Errors quote the value only through ``text.shown``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _check_value(name, value, option)
            except ValidationError as exc:
                errors.append(exc)
        raise errors[0]
    if hint is type(None):
        if value is not None:
            raise ValidationError(f"field {name!r} must be null")
        return None
    if origin is list:
        if not isinstance(value, list):
            raise ValidationError(f"field {name!r} must be a list")
        (item,) = typing.get_args(hint)
        return [_check_value(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValidationError(f"field {name!r} must be a map with text keys")
        return value  # its structure is checked by whoever reads it (spec, secagg, admin)
    if hint is Any:
        return value
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value):
            raise ValidationError(
                f"field {name!r} must be a finite number, got {text.shown(value)}"
            )
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValidationError(f"field {name!r} must be an integer, got {text.shown(value)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValidationError(f"field {name!r} must be true or false, got {text.shown(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ValidationError(f"field {name!r} must be text, got {type(value).__name__}")
        if len(value) > MAX_STR:
            raise ValidationError(f"field {name!r} is longer than {MAX_STR} characters")
        return text.clean(value, MAX_STR)
    if hint is bytes:
        if not isinstance(value, bytes):
            raise ValidationError(f"field {name!r} must be bytes, got {type(value).__name__}")
        return value
    raise TypeError(f"unsupported field type {hint!r}")  # a bug in this module, not input


#: The same check for other typed payloads of the protocol (protocol.events).
check_value = _check_value


# What fednode.quality.data_report produces, and the most a peer may send of it: the report
# is a participant's claim about its data, stored and scored by the coordinator.
REPORT_COUNTS = ("rows", "missing", "duplicates")
MAX_LABELS = 1000
MAX_LABEL_CHARS = 64
MAX_COUNT = 2**63 - 1


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise ValidationError(
            f"field {name!r} must be an integer >= 0, got {text.shown(value)}",
            hint="the participant's data report is malformed; update that participant",
        )
    return value


def _data_report(name: str, value: dict[str, Any]) -> dict[str, Any]:
    """``{}`` (not measured) or exactly {rows, missing, duplicates, label_counts}, every
    count an integer >= 0, at most MAX_LABELS labels of at most MAX_LABEL_CHARS characters
    (cleaned). Whether the counts agree with each other is fednode.quality's business."""
    if not value:
        return {}
    hint = "the participant's data report is malformed; update that participant"
    wanted = {*REPORT_COUNTS, "label_counts"}
    if set(value) != wanted:
        odd = sorted(set(value) ^ wanted)
        raise ValidationError(
            f"field {name!r} must have exactly the keys {', '.join(sorted(wanted))}; "
            f"not {text.shown(odd)}",
            hint=hint,
        )
    out: dict[str, Any] = {k: _count(f"{name}.{k}", value[k]) for k in REPORT_COUNTS}
    labels = value["label_counts"]
    where = f"{name}.label_counts"
    if not isinstance(labels, dict):
        raise ValidationError(f"field {where!r} must be a map of label to count", hint=hint)
    if len(labels) > MAX_LABELS:
        raise ValidationError(
            f"field {where!r} has {len(labels)} labels, more than {MAX_LABELS}", hint=hint
        )
    counts: dict[str, int] = {}
    for label, count in labels.items():
        if not isinstance(label, str) or len(label) > MAX_LABEL_CHARS:
            raise ValidationError(
                f"field {where!r} has a label that is not text of at most {MAX_LABEL_CHARS} "
                f"characters: {text.shown(label)}",
                hint=hint,
            )
        key = text.clean(label, MAX_LABEL_CHARS)
        if key in counts:
            raise ValidationError(f"field {where!r} repeats label {key!r}", hint=hint)
        counts[key] = _count(f"{where}[{key!r}]", count)
    out["label_counts"] = counts
    return out


# A round's strategy settings (round_start.strategy): a few scalars by name. What each means
# is the participant's business (fednode.round_config); this bounds what it has to look at.
MAX_SETTINGS = 16
MAX_SETTING_CHARS = 256


def _settings(name: str, value: dict[str, Any]) -> dict[str, Any]:
    """At most MAX_SETTINGS keys, each a plug-in name (protocol.plugins.NAME_RE), each value
    a bool, an integer, a finite number or text of at most MAX_SETTING_CHARS (cleaned)."""
    hint = "the coordinator's strategy sent a malformed round configuration"
    if len(value) > MAX_SETTINGS:
        raise ValidationError(
            f"field {name!r} has {len(value)} settings, more than {MAX_SETTINGS}", hint=hint
        )
    out: dict[str, Any] = {}
    for key, v in value.items():
        if not plugins.NAME_RE.match(key):
            raise ValidationError(
                f"field {name!r} has a key that is not a setting name: {text.shown(key)}",
                hint=hint,
            )
        where = f"{name}.{key}"
        integer = isinstance(v, int) and abs(v) <= MAX_COUNT  # bool is an int too
        if integer or (isinstance(v, float) and math.isfinite(v)):
            out[key] = v
        elif isinstance(v, str) and len(v) <= MAX_SETTING_CHARS:
            out[key] = text.clean(v, MAX_SETTING_CHARS)
        else:
            raise ValidationError(
                f"field {where!r} must be true/false, a number or text of at most "
                f"{MAX_SETTING_CHARS} characters, got {text.shown(v)}",
                hint=hint,
            )
    return out


# A participant's evaluation of the round's model on its held-out data (evaluation.on =
# "participants" | "both"): the task's metrics by name, each with the range it can take, so
# that a peer's figure outside it is refused rather than averaged into the round's figures.
# The names are those of fednode.training's metrics; the loss travels in its own field.
EVAL_METRICS: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0),
    "roc_auc": (0.0, 1.0),
    "mae": (0.0, 1e12),
    "r2": (-1e12, 1.0),  # R² is below 0 for a model worse than the mean
}
MAX_EVAL_LOSS = 1e12
# How reports and the dashboard name each metric, and the one a session is followed by (its
# headline): accuracy where the task has it (classification, binary), else R², else MAE.
METRIC_LABELS: dict[str, str] = {
    "accuracy": "accuracy",
    "roc_auc": "ROC AUC",
    "mae": "MAE",
    "r2": "R²",
}
HEADLINE_METRICS = ("accuracy", "r2", "mae", "roc_auc")
LOWER_IS_BETTER = frozenset({"mae"})  # every other metric: higher is better


def headline_metric(names: typing.Iterable[str]) -> str | None:
    """The metric to plot and show first among ``names`` (None: none of EVAL_METRICS)."""
    have = set(names)
    return next((m for m in HEADLINE_METRICS if m in have), None)


def _eval_metrics(name: str, value: dict[str, Any]) -> dict[str, float]:
    """At most the EVAL_METRICS names, each a finite number within its range."""
    hint = "the participant's evaluation report is malformed; update that participant"
    out: dict[str, float] = {}
    for key, v in value.items():
        span = EVAL_METRICS.get(key)
        if span is None:
            raise ValidationError(
                f"field {name!r} has an unknown metric {text.shown(key)}; known: "
                + ", ".join(EVAL_METRICS),
                hint=hint,
            )
        lo, hi = span
        number = isinstance(v, int | float) and not isinstance(v, bool)
        if not number or not math.isfinite(v) or not lo <= v <= hi:
            raise ValidationError(
                f"field {name}.{key} must be a number in [{lo:g}, {hi:g}], got {text.shown(v)}",
                hint=hint,
            )
        out[key] = float(v)
    return out


def _check_eval(msg: Update | SecaggMasked) -> None:
    """An update's evaluation report: none at all (eval_examples 0, no loss, no metrics), or
    examples > 0 with a loss in [0, MAX_EVAL_LOSS]."""
    n, loss, metrics = msg.eval_examples, msg.eval_loss, msg.eval_metrics
    if not 0 <= n <= MAX_COUNT:
        raise ValidationError(f"field 'eval_examples' of {msg.TYPE!r} must be >= 0")
    if n == 0:
        if loss is not None or metrics:
            raise ValidationError(
                f"{msg.TYPE!r} reports an evaluation (eval_loss or eval_metrics) of 0 examples"
            )
        return
    if loss is None or not 0 <= loss <= MAX_EVAL_LOSS:
        raise ValidationError(
            f"field 'eval_loss' of {msg.TYPE!r} must be a number in [0, {MAX_EVAL_LOSS:g}] "
            f"when eval_examples > 0, got {text.shown(loss)}"
        )


# An update's local-DP figures (fednode.dpsgd): each field's closed range. ε above 10⁹ is no
# privacy at all and is reported as 10⁹; dp_max_epsilon is optional even with the others.
MAX_DP_EPSILON = 1e9
DP_FIELDS: dict[str, tuple[float, float]] = {
    "dp_epsilon": (0.0, MAX_DP_EPSILON),
    "dp_spent_epsilon": (0.0, MAX_DP_EPSILON),
    "dp_delta": (0.0, 1.0),
    "dp_noise_multiplier": (0.0, 1e6),
    "dp_sample_rate": (0.0, 1.0),
    "dp_steps": (0, MAX_COUNT),
    "dp_max_epsilon": (0.0, MAX_DP_EPSILON),
}
DP_ACCOUNTANTS = ("rdp", "prv")


def _check_dp(msg: Update | SecaggMasked) -> None:
    """No DP figures at all, or every one of them (dp_max_epsilon optional), each in its
    DP_FIELDS range and the accountant one of DP_ACCOUNTANTS."""
    given = {k for k in (*DP_FIELDS, "dp_accountant") if getattr(msg, k) is not None}
    if not given:
        return
    hint = "the participant's privacy report is malformed; update that participant"
    missing = sorted({*DP_FIELDS, "dp_accountant"} - given - {"dp_max_epsilon"})
    if missing:
        raise ValidationError(
            f"{msg.TYPE!r} reports DP figures without {', '.join(missing)}", hint=hint
        )
    for name, (lo, hi) in DP_FIELDS.items():
        v = getattr(msg, name)
        if v is not None and not lo <= v <= hi:
            raise ValidationError(
                f"field {name!r} of {msg.TYPE!r} must be in [{lo:g}, {hi:g}], got {text.shown(v)}",
                hint=hint,
            )
    if msg.dp_accountant not in DP_ACCOUNTANTS:
        raise ValidationError(
            f"field 'dp_accountant' of {msg.TYPE!r} must be one of "
            f"{', '.join(DP_ACCOUNTANTS)}, got {text.shown(msg.dp_accountant)}",
            hint=hint,
        )


def _plugin_name(name: str, value: str) -> str:
    if not plugins.NAME_RE.match(value):
        raise ValidationError(f"field {name!r} is not a plug-in name: {text.shown(value)}")
    return value


# Fields whose content is checked beyond their type: (message type, field) -> checker, which
# returns the value to keep.
_FIELD_CHECKS: dict[tuple[str, str], Callable[[str, Any], Any]] = {
    ("register", "data_report"): _data_report,
    ("round_start", "strategy"): _settings,
    ("round_start", "codec"): _plugin_name,
    ("round_start", "privacy"): _plugin_name,
    ("update", "eval_metrics"): _eval_metrics,
    ("secagg_masked", "eval_metrics"): _eval_metrics,
}


@dataclasses.dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""

    def validate(self) -> None:
        """Range checks beyond types; subclasses extend."""


def _nonneg(msg: Message, *names: str) -> None:
    for name in names:
        if getattr(msg, name) < 0:
            raise ValidationError(f"field {name!r} of {msg.TYPE!r} must be >= 0")


def _percent(msg: Message, *names: str) -> None:
    for name in names:
        value = getattr(msg, name)
        if value is not None and not 0 <= value <= 100:
            raise ValidationError(f"field {name!r} of {msg.TYPE!r} must be in [0, 100] or null")


# --- participant → coordinator -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Register(Message):
    TYPE: ClassVar[str] = "register"
    dataset: str
    num_examples: int
    version: str
    join_token: str = ""
    # checks the participant ran on its data at load (fednode.quality.data_report): counts only
    data_report: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        _nonneg(self, "num_examples")


@dataclasses.dataclass(frozen=True)
class Heartbeat(Message):
    TYPE: ClassVar[str] = "heartbeat"
    status: str  # idle | training
    ts: float
    # psutil figures of the participant's process (docs/quality.md); None = not measured
    cpu_efficiency: float | None = None
    memory_efficiency: float | None = None

    def validate(self) -> None:
        _percent(self, "cpu_efficiency", "memory_efficiency")


@dataclasses.dataclass(frozen=True)
class Fetch(Message):
    TYPE: ClassVar[str] = "fetch"
    cid: str
    # the CID of the last model of this session the participant holds ("" = none): the
    # coordinator may answer with a model_delta from it (compression.downlink)
    have: str = ""

    def validate(self) -> None:
        if not 0 < len(self.cid) <= MAX_ID:
            raise ValidationError("field 'cid' of 'fetch' must be a CID")
        if len(self.have) > MAX_ID:
            raise ValidationError("field 'have' of 'fetch' must be a CID or empty")


@dataclasses.dataclass(frozen=True)
class Update(Message):
    TYPE: ClassVar[str] = "update"
    round: int
    base_cid: str
    num_examples: int
    loss: float
    train_s: float
    update_cid: str
    data: bytes  # safetensors
    # the round's model download as the participant timed it (0 when it had the model already)
    fetch_bytes: int = 0
    fetch_s: float = 0.0
    # psutil figures of this task (docs/quality.md); None = not measured
    cpu_efficiency: float | None = None
    memory_efficiency: float | None = None
    # the round's model (base_cid) evaluated on the participant's held-out split, when the
    # spec's evaluation.on asks for it (0 / None / {} = not evaluated); EVAL_METRICS bounds it
    eval_examples: int = 0
    eval_loss: float | None = None
    eval_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    # local DP-SGD (privacy.mode = "local_dp", fednode.dpsgd): what the participant has spent
    # on this data, by Opacus's accountant; all None = trained without it (DP_FIELDS bounds)
    dp_epsilon: float | None = None  # ε of this session so far, this round included
    dp_spent_epsilon: float | None = None  # ε of all its training on this data, all sessions
    dp_delta: float | None = None
    dp_noise_multiplier: float | None = None
    dp_sample_rate: float | None = None
    dp_steps: int | None = None  # DP-SGD steps of this session so far
    dp_accountant: str | None = None  # rdp | prv
    dp_max_epsilon: float | None = None  # its operator's --max-epsilon, if it says

    def validate(self) -> None:
        _nonneg(self, "round", "num_examples", "train_s", "fetch_bytes", "fetch_s")
        _percent(self, "cpu_efficiency", "memory_efficiency")
        if self.num_examples == 0:
            raise ValidationError("field 'num_examples' of 'update' must be > 0")
        _check_eval(self)
        _check_dp(self)


@dataclasses.dataclass(frozen=True)
class UploadReady(Message):
    """participant → coordinator: my update of ``round`` is ready, ``bytes`` on the wire.
    It is sent only once granted (``upload_grant``): the coordinator bounds the uploads in
    flight, so a thousand participants finishing at once cannot all send at once."""

    TYPE: ClassVar[str] = "upload_ready"
    round: int
    bytes: int

    def validate(self) -> None:
        _nonneg(self, "round")
        if not 0 < self.bytes <= limits.MAX_BYTES["update"]:
            raise ValidationError(
                f"field 'bytes' of 'upload_ready' must be 1..{limits.MAX_BYTES['update']:,}"
            )


@dataclasses.dataclass(frozen=True)
class TaskError(Message):
    TYPE: ClassVar[str] = "task_error"
    round: int
    code: str
    message: str


# --- coordinator → participant -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    peer_id: str
    role: str  # participant | operator | viewer
    heartbeat_s: float
    version: str


@dataclasses.dataclass(frozen=True)
class Admitted(Message):
    """The answer to a successful ``register``: the sessions this peer may take part in."""

    TYPE: ClassVar[str] = "admitted"
    sessions: list[str]


@dataclasses.dataclass(frozen=True)
class Block(Message):
    TYPE: ClassVar[str] = "block"
    cid: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class ModelDelta(Message):
    """The answer to a ``fetch`` naming a held model, when a difference from it is smaller
    than the model (fednode.downlink): the participant rebuilds ``result`` from ``base`` and
    ``data`` and checks it hashes to ``result`` (== ``cid`` when lossless)."""

    TYPE: ClassVar[str] = "model_delta"
    cid: str  # the model asked for
    base: str  # the held model the difference is from
    result: str  # the CID of what the rebuild gives
    encoding: str  # fednode.downlink.ENCODINGS
    data: bytes

    def validate(self) -> None:
        for name in ("cid", "base", "result"):
            if not 0 < len(getattr(self, name)) <= MAX_ID:
                raise ValidationError(f"field {name!r} of 'model_delta' must be a CID")
        if self.encoding not in ("xor_zlib", "fp16"):
            raise ValidationError(
                f"field 'encoding' of 'model_delta' is {text.shown(self.encoding)}: expected "
                "xor_zlib or fp16"
            )


@dataclasses.dataclass(frozen=True)
class RoundStart(Message):
    TYPE: ClassVar[str] = "round_start"
    round: int
    model_cid: str
    spec: dict[str, Any]  # the session spec; the participant re-validates it
    deadline_s: float
    # secure aggregation of this round: parameters, graph seed, round tag, participants
    secagg: dict[str, Any] = dataclasses.field(default_factory=dict)
    # the strategy's settings for this round (fednode.strategies: round_config), e.g. FedProx's
    # {"mu": 0.01}; the participant applies each or declines the task (fednode.round_config)
    strategy: dict[str, Any] = dataclasses.field(default_factory=dict)
    # how the participant encodes its update (fednode.codecs) and what wraps its local
    # training (fednode.privacy): names it must have registered
    codec: str = plugins.IDENTITY_CODEC
    privacy: str = plugins.NO_PRIVACY

    def validate(self) -> None:
        _nonneg(self, "round", "deadline_s")


@dataclasses.dataclass(frozen=True)
class UploadGrant(Message):
    """The answer to ``upload_ready``: send the update of ``round`` now."""

    TYPE: ClassVar[str] = "upload_grant"
    round: int


@dataclasses.dataclass(frozen=True)
class RoundEnd(Message):
    TYPE: ClassVar[str] = "round_end"
    round: int
    status: str
    model_cid: str
    accuracy: float | None = None


@dataclasses.dataclass(frozen=True)
class SessionEnd(Message):
    TYPE: ClassVar[str] = "session_end"
    status: str
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Error(Message):
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    hint: str = ""


# --- secure aggregation (protocol.secagg), in the order they are sent -------------------


@dataclasses.dataclass(frozen=True)
class SecaggKeys(Message):
    """participant → coordinator: two fresh X25519 public keys for this round."""

    TYPE: ClassVar[str] = "secagg_keys"
    round: int
    c_pk: bytes
    s_pk: bytes


@dataclasses.dataclass(frozen=True)
class SecaggRoster(Message):
    """coordinator → participant: everyone's keys (U1)."""

    TYPE: ClassVar[str] = "secagg_roster"
    round: int
    roster: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SecaggShares(Message):
    """participant → coordinator: encrypted Shamir shares, one ciphertext per neighbour."""

    TYPE: ClassVar[str] = "secagg_shares"
    round: int
    shares: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SecaggRelay(Message):
    """coordinator → participant: the ciphertexts addressed to it (U2)."""

    TYPE: ClassVar[str] = "secagg_relay"
    round: int
    shares: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SecaggMasked(Message):
    """participant → coordinator: the masked fixed-point [n, n·w] vector, packed
    (ceil(bits/8) little-endian bytes per value, protocol.secagg.pack)."""

    TYPE: ClassVar[str] = "secagg_masked"
    round: int
    data: bytes
    loss: float
    train_s: float
    fetch_bytes: int = 0
    fetch_s: float = 0.0
    cpu_efficiency: float | None = None
    memory_efficiency: float | None = None
    # as in 'update': the round's model evaluated on the participant's held-out split (in the
    # clear: figures of the global model, not of this participant's update)
    eval_examples: int = 0
    eval_loss: float | None = None
    eval_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    # as in 'update': local DP-SGD's spending, in the clear (figures of the participant's
    # training, not of its update; DP_FIELDS bounds them)
    dp_epsilon: float | None = None
    dp_spent_epsilon: float | None = None
    dp_delta: float | None = None
    dp_noise_multiplier: float | None = None
    dp_sample_rate: float | None = None
    dp_steps: int | None = None
    dp_accountant: str | None = None
    dp_max_epsilon: float | None = None

    def validate(self) -> None:
        _nonneg(self, "round", "train_s", "fetch_bytes", "fetch_s")
        _percent(self, "cpu_efficiency", "memory_efficiency")
        _check_eval(self)
        _check_dp(self)


@dataclasses.dataclass(frozen=True)
class SecaggUnmaskRequest(Message):
    """coordinator → participant: who survived (U3) and who dropped (U2 minus U3)."""

    TYPE: ClassVar[str] = "secagg_unmask_request"
    round: int
    survivors: list[str]
    dropped: list[str]


@dataclasses.dataclass(frozen=True)
class SecaggUnmask(Message):
    """participant → coordinator: shares of survivors' self-mask seeds, dropped ones' keys."""

    TYPE: ClassVar[str] = "secagg_unmask"
    round: int
    b: dict[str, Any]
    s: dict[str, Any]


# --- operator ⇄ coordinator ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Admin(Message):
    TYPE: ClassVar[str] = "admin"
    id: int
    op: str
    args: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class AdminReply(Message):
    TYPE: ClassVar[str] = "admin_reply"
    id: int
    ok: bool
    result: dict[str, Any]
    error: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Event(Message):
    TYPE: ClassVar[str] = "event"
    kind: str
    data: dict[str, Any]
    ts: float


MESSAGES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Register,
        Heartbeat,
        Fetch,
        Update,
        UploadReady,
        TaskError,
        Welcome,
        Admitted,
        Block,
        ModelDelta,
        RoundStart,
        UploadGrant,
        RoundEnd,
        SessionEnd,
        Error,
        SecaggKeys,
        SecaggRoster,
        SecaggShares,
        SecaggRelay,
        SecaggMasked,
        SecaggUnmaskRequest,
        SecaggUnmask,
        Admin,
        AdminReply,
        Event,
    )
}
SECAGG_FROM_PARTICIPANT = (SecaggKeys, SecaggShares, SecaggMasked, SecaggUnmask)
SECAGG_TO_PARTICIPANT = (SecaggRoster, SecaggRelay, SecaggUnmaskRequest)
_HINTS = {name: typing.get_type_hints(cls) for name, cls in MESSAGES.items()}


def parse(type_: str, payload: dict[str, Any]) -> Message:
    """A checked, typed message from a verified envelope's type and payload; every string
    in its typed fields cleaned (protocol.text), every quoted peer value bounded."""
    cls = MESSAGES.get(type_)
    if cls is None:
        raise ValidationError(
            f"unknown message type {text.shown(type_)}",
            hint="the peer runs a newer or different protocol",
            code="UNKNOWN_TYPE",
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra = [k for k in payload if k not in fields]
    if extra:
        # keys may be of any CBOR type: sort by text, and quote a bounded excerpt only
        extra.sort(key=lambda k: (not isinstance(k, str), str(k)[: text.SHOWN]))
        raise ValidationError(
            f"message {type_!r} has {len(extra)} unknown field(s): {text.shown(extra)}"
        )
    hints = _HINTS[type_]
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in payload:
            no_default = (
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            )
            if no_default:
                raise ValidationError(f"message {type_!r} is missing field {name!r}")
            continue
        where = f"{type_}.{name}"
        value = _check_value(where, payload[name], hints[name])
        check = _FIELD_CHECKS.get((type_, name))
        values[name] = value if check is None else check(where, value)
    msg = cls(**values)
    msg.validate()
    return msg


def payload(msg: Message) -> dict[str, Any]:
    return {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
