"""The membership-inference privacy audit: how well can an attacker tell, from a model's
predictions, whether a record was in its training data?

Two attacks, both black-box on the model's output (logits):

* **Shadow models** (Shokri et al. 2017, with the global attack model of Salem et al. 2019):
  train ``shadows`` models like the target (same model spec, optimiser, batch size, learning
  rate, epochs = local_epochs × rounds) on random halves of a *shadow pool* of the same
  distribution; each shadow model's prediction vectors on its own half are labelled "in",
  on the other half "out". An attack model (scikit-learn logistic regression on the
  standardised log of the sorted prediction vector and the log-probability of the true
  label) learns in-versus-out and then scores the target model's predictions.
* **Likelihood ratio, offline** (LiRA, Carlini et al. 2022, §VI "offline" variant): every
  shadow model is an *out* model for the audited records (the shadow pool is disjoint from
  them). For each record, the shadow models' logit-scaled confidence in its true label
  φ = log p_y − log(1 − p_y) gives the mean an out-model reaches; with the variance pooled
  over records (the paper's choice when shadow models are few) the score is
  (φ_target − μ_out) / σ_out, one-sided: the more the target model is surer than the
  out-models, the likelier the record was a member.

Each attack is scored on a balanced set of evaluated members and non-members: ROC AUC,
attack accuracy (the best balanced accuracy over thresholds, (TPR + TNR) / 2, as Carlini et
al. report it: an upper bound, the threshold being chosen with the answers), and the TPR at
0.1 % and 1 % FPR (sklearn.metrics.roc_curve; the largest TPR whose FPR does not exceed the
target: with n non-members the finest FPR measurable is 1/n, given as ``fpr_floor``).

Pure but for training: data, weights and settings in, figures out; nothing is read from or
written to disk or the network here (the CLI, fedctl audit privacy, gets the inputs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from fednode import training
from fednode.data import Dataset
from fednode.weights import Weights
from protocol.errors import DataError, Unsupported

ATTACKS = ("shadow", "lira")  # the keys of AuditResult.attacks
FPR_TARGETS = (0.001, 0.01)
DEFAULT_SHADOWS = 8
MIN_EVAL = 10  # fewer evaluated records per side than this give no meaningful figure
_LOG_FLOOR = -80.0  # log-probabilities below this are one and the same "impossible"


@dataclass(frozen=True)
class AttackFigures:
    auc: float
    accuracy: float
    tpr_at_0_1pct_fpr: float
    tpr_at_1pct_fpr: float


@dataclass(frozen=True)
class AuditResult:
    attacks: dict[str, AttackFigures]  # by name: ATTACKS
    members: int  # evaluated members (as many as non-members)
    nonmembers: int
    shadow_models: int
    shadow_examples: int  # the shadow pool; each shadow model trains on half of it
    shadow_epochs: int
    member_accuracy: float  # the target model's accuracy on the evaluated members
    nonmember_accuracy: float  # ... and non-members: the generalisation gap
    fpr_floor: float  # 1 / non-members: the smallest FPR the figures can resolve
    seed: int

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["attacks"] = {k: asdict(v) for k, v in self.attacks.items()}
        return out


def check_model(model_spec: dict[str, Any]) -> None:
    """The audit reads class-probability vectors: a classification model only."""
    task = model_spec.get("task", "classification")
    if task != "classification":
        raise Unsupported(
            f"model.task = {task!r}: the membership-inference audit needs a classification "
            "model (it attacks the predicted class probabilities)",
            hint='audit a session whose spec has model.task = "classification"',
        )


def audit_sets(
    members: Dataset, nonmembers: Dataset, *, seed: int, max_eval: int = 0
) -> tuple[Dataset, Dataset, Dataset]:
    """(evaluated members, evaluated non-members, shadow pool) from what is known.

    As many members as non-members are evaluated (a balanced test), at most half the
    non-members (the rest are needed in the shadow pool) and at most ``max_eval`` (0: no
    cap). The shadow pool is everything else, members and non-members alike: the shadow
    models only need data of the same distribution, and none of them sees an evaluated
    record, which is what makes them *out* models for LiRA.
    """
    m = min(len(members), len(nonmembers) // 2)
    if max_eval > 0:
        m = min(m, max_eval)
    if m < MIN_EVAL:
        raise DataError(
            f"the audit needs at least {MIN_EVAL} members and {2 * MIN_EVAL} non-members; "
            f"it has {len(members)} members and {len(nonmembers)} non-members",
            hint="give more data with --members and --nonmembers",
        )
    rng = np.random.default_rng(seed)
    pm, pn = rng.permutation(len(members)), rng.permutation(len(nonmembers))
    pool = Dataset(
        np.concatenate([members.x[pm[m:]], nonmembers.x[pn[m:]]]),
        np.concatenate([members.y[pm[m:]], nonmembers.y[pn[m:]]]),
    )
    return _take(members, pm[:m]), _take(nonmembers, pn[:m]), pool


def audit(
    model_spec: dict[str, Any],
    weights: Weights,
    members: Dataset,
    nonmembers: Dataset,
    shadow_pool: Dataset,
    cfg: training.TrainConfig,
    *,
    shadows: int = DEFAULT_SHADOWS,
    seed: int = 0,
) -> AuditResult:
    """Attack the model (``weights``) on ``members`` (label: in) and ``nonmembers`` (out),
    with ``shadows`` shadow models trained with ``cfg`` on halves of ``shadow_pool``."""
    check_model(model_spec)
    if shadows < 2:
        raise DataError(f"shadows = {shadows}: the audit needs at least 2 shadow models")
    if len(shadow_pool) < 4:
        raise DataError(f"the shadow pool has {len(shadow_pool)} examples; it needs at least 4")
    target = Dataset(
        np.concatenate([members.x, nonmembers.x]), np.concatenate([members.y, nonmembers.y])
    )
    truth = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    target_logits = training.predict(model_spec, weights, target)

    rng = np.random.default_rng(seed)
    shadow_x: list[np.ndarray] = []  # attack-model training features, in and out
    shadow_in: list[np.ndarray] = []
    out_phi: list[np.ndarray] = []  # each shadow model's φ on the audited records
    half = len(shadow_pool) // 2
    for k in range(shadows):
        order = rng.permutation(len(shadow_pool))
        inside = np.zeros(len(shadow_pool), dtype=bool)
        inside[order[:half]] = True
        trained = training.train(
            model_spec,
            training.init_weights(model_spec, seed + k),
            _take(shadow_pool, order[:half]),
            _with_seed(cfg, seed + k),
        ).weights
        logits = training.predict(model_spec, trained, shadow_pool)
        shadow_x.append(_features(logits, shadow_pool.y))
        shadow_in.append(inside)
        out_phi.append(_phi(training.predict(model_spec, trained, target), target.y))

    shadow_scores = _shadow_attack(
        np.concatenate(shadow_x),
        np.concatenate(shadow_in),
        _features(target_logits, target.y),
        seed,
    )
    lira_scores = _lira(np.stack(out_phi), _phi(target_logits, target.y))
    pred = target_logits.argmax(axis=1) == target.y
    n_mem = len(members)
    return AuditResult(
        attacks={
            "shadow": _figures(truth, shadow_scores),
            "lira": _figures(truth, lira_scores),
        },
        members=n_mem,
        nonmembers=len(nonmembers),
        shadow_models=shadows,
        shadow_examples=len(shadow_pool),
        shadow_epochs=cfg.local_epochs,
        member_accuracy=float(pred[:n_mem].mean()),
        nonmember_accuracy=float(pred[n_mem:].mean()),
        fpr_floor=1.0 / len(nonmembers),
        seed=seed,
    )


# --------------------------------------------------------------------------- the attacks


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _features(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Shadow-attack features: the log of the sorted prediction vector (largest first) and
    the log-probability of the true label (which the sorted vector alone loses)."""
    logp = np.maximum(_log_softmax(logits), _LOG_FLOOR)
    ranked = -np.sort(-logp, axis=1)
    true = logp[np.arange(len(y)), y]
    return np.column_stack([ranked, true])


def _phi(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """LiRA's logit-scaled confidence log p_y − log(1 − p_y), computed from logits without
    forming p (which rounds to 1 for a confident model): z_y − logsumexp(z_j, j ≠ y)."""
    rows = np.arange(len(y))
    true = logits[rows, y]
    rest = logits.copy()
    rest[rows, y] = -np.inf
    peak = rest.max(axis=1)
    return true - (peak + np.log(np.exp(rest - peak[:, None]).sum(axis=1)))


def _shadow_attack(x: np.ndarray, inside: np.ndarray, target: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    model.fit(x, inside.astype(int))
    return np.asarray(model.predict_proba(target)[:, 1], dtype=np.float64)


def _lira(out_phi: np.ndarray, target_phi: np.ndarray) -> np.ndarray:
    """The one-sided offline test's statistic per record: out_phi is [shadows, records]."""
    mu = out_phi.mean(axis=0)
    sigma = float(np.sqrt(((out_phi - mu) ** 2).mean()))  # pooled over records
    return (target_phi - mu) / max(sigma, 1e-12)


def _figures(truth: np.ndarray, scores: np.ndarray) -> AttackFigures:
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(truth, scores)

    def tpr_at(target: float) -> float:
        return float(tpr[fpr <= target].max())  # roc_curve starts at (0, 0)

    return AttackFigures(
        auc=float(roc_auc_score(truth, scores)),
        accuracy=float(((tpr + 1.0 - fpr) / 2.0).max()),
        tpr_at_0_1pct_fpr=tpr_at(FPR_TARGETS[0]),
        tpr_at_1pct_fpr=tpr_at(FPR_TARGETS[1]),
    )


# -------------------------------------------------------------------------------- helpers


def _take(ds: Dataset, idx: np.ndarray) -> Dataset:
    return Dataset(ds.x[idx], ds.y[idx])


def _with_seed(cfg: training.TrainConfig, seed: int) -> training.TrainConfig:
    return replace(cfg, seed=seed)


def shadow_config(spec: dict[str, Any]) -> training.TrainConfig:
    """How shadow models train for a session: its [training] settings, centralised, for as
    many epochs as a participant's data saw over the session (local_epochs × rounds; capped
    at 1000, TrainConfig's limit for local_epochs)."""
    t = spec["training"]
    epochs = min(1000, max(1, int(t["local_epochs"]) * int(spec["rounds"])))
    return training.TrainConfig.of_spec(t, local_epochs=epochs)
