"""Local DP-SGD with Opacus: one round's plan, its training, and the accounting of ε.

A participant of a ``privacy.mode = "local_dp"`` session trains with Opacus's
PrivacyEngine: Poisson sampling of its examples (each one in a batch with probability
``sample_rate``), each example's gradient clipped to ``max_grad_norm`` and Gaussian noise of
standard deviation ``noise_multiplier · max_grad_norm`` added to their sum. The update that
leaves is therefore (ε, δ)-DP for every record of this participant's data, whoever sees it.

**The accountant's state is a list, not an object.** Opacus's RDP and PRV accountants both
keep ``history``: one ``(noise_multiplier, sample_rate, steps)`` entry per stretch of
training. This module rebuilds an accountant from such a list (``epsilon``), so the
participant's ledger keeps the entries (``privacy_spending``, one per trained round) and
nothing is pickled: the spending survives restarts and carries over between sessions on the
same data, which is what a budget the participant owns (``fednode run --max-epsilon``) needs.

**Sampling as Opacus does it.** ``sample_rate`` is Opacus's own ``1 / len(data_loader)``,
i.e. ``1 / ceil(n / batch_size)`` (= batch_size / n when the batch size divides n), and an
epoch is ``ceil(n / batch_size)`` Poisson batches: the accountant is told exactly the
sampling that runs.

**Where the randomness comes from.** The Poisson sampling and the noise are drawn from a
generator seeded from this machine's entropy (``os.urandom``), never from the session's seed,
round and peer ID: anyone who knows those (the coordinator) could otherwise regenerate the
noise and subtract it. Everything else (the model, its weights, the data order that is not
sampled) is as deterministic as plain training. Tests may pass a seed (``DPRound.seed``).
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from fednode import training
from fednode.data import Dataset
from fednode.weights import Weights
from protocol.errors import SpecError, Unsupported

ACCOUNTANTS = ("rdp", "prv")
# The share of its --max-epsilon a participant may spend before it is warned (its own
# ledger) and the coordinator raises a privacy_budget alert.
BUDGET_WARNING_SHARE = 0.8
# What an update may report as ε (protocol.messages bounds it): a larger ε is no privacy at
# all, and is reported as this.
MAX_REPORTED_EPSILON = 1e9

# (noise_multiplier, sample_rate, steps): one entry of an Opacus accountant's history
Entry = tuple[float, float, int]

# Warnings that say nothing to a node's operator, once per process (catch_warnings is not
# thread-safe, and training runs in a worker thread):
# - RDP's "optimal order is the largest alpha": a tighter bound may exist; the ε returned
#   is still a valid upper bound;
# - "Secure RNG turned off": Opacus's secure_mode needs torchcsprng; the noise here comes
#   from a generator seeded by os.urandom (the module's docstring says what that means);
# - "Full backward hook is firing ...": the input needs no gradient; Opacus's per-example
#   hooks still see every layer.
for _message in (
    "Optimal order is the largest alpha",
    "Secure RNG turned off",
    "Full backward hook is firing",
):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Opacus's len(data_loader): the Poisson batches of one local epoch."""
    return max(1, math.ceil(n / batch_size))


def sample_rate(n: int, batch_size: int) -> float:
    """The probability of each example to be in a batch (Opacus: 1 / len(data_loader))."""
    return 1.0 / batches_per_epoch(n, batch_size)


def _merged(history: Iterable[Entry]) -> list[Entry]:
    """Consecutive entries of the same noise and sample rate as one (as Opacus's own step
    hook keeps them): the same ε, and the PRV accountant composes fewer distributions."""
    out: list[Entry] = []
    for nm, q, steps in history:
        if steps <= 0:
            continue
        if out and out[-1][0] == nm and out[-1][1] == q:
            out[-1] = (nm, q, out[-1][2] + int(steps))
        else:
            out.append((float(nm), float(q), int(steps)))
    return out


def epsilon(history: Iterable[Entry], delta: float, accountant: str) -> float:
    """ε spent by the training of ``history`` at ``delta``, by Opacus's accountant
    (``rdp`` or ``prv``); 0 for no training."""
    from opacus.accountants import create_accountant  # opacus takes a second to import

    entries = _merged(history)
    if not entries:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = entries
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=64)
def derive_noise_multiplier(
    target_epsilon: float, delta: float, rate: float, steps: int, accountant: str
) -> float:
    """σ that spends ``target_epsilon`` at ``delta`` over ``steps`` steps of sample rate
    ``rate`` (Opacus's own binary search, ε within 0.01 below the target)."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.01,
            )
        )
    except ValueError:  # Opacus: "The privacy budget is too low" (σ above 10⁶)
        raise SpecError(
            f"privacy.target_epsilon = {target_epsilon:g} at delta = {delta:g} cannot be met "
            f"over {steps} DP-SGD steps of sample rate {rate:.4g}: the noise would exceed 10⁶ "
            "times the clipping norm",
            hint="raise privacy.target_epsilon or delta, or train fewer rounds, epochs or steps",
        ) from None


@dataclass(frozen=True)
class DPRound:
    """One round of local DP-SGD on this participant, planned before anything trains."""

    noise_multiplier: float
    sample_rate: float
    steps: int  # this round's optimizer steps: local_epochs × batches_per_epoch
    max_grad_norm: float
    delta: float
    accountant: str  # rdp | prv
    # what this participant trained on the same data before: in this session, and in all
    # (this session's rounds included): (noise_multiplier, sample_rate, steps) entries
    session_history: tuple[Entry, ...] = ()
    dataset_history: tuple[Entry, ...] = ()
    max_epsilon: float | None = None  # fednode run --max-epsilon
    seed: int | None = None  # None: the noise and sampling come from os.urandom
    _cache: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    @property
    def entry(self) -> Entry:
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def session_epsilon(self) -> float:
        """ε of this session on this data after this round."""
        if "session" not in self._cache:
            h = (*self.session_history, self.entry)
            self._cache["session"] = epsilon(h, self.delta, self.accountant)
        return self._cache["session"]

    def spent_epsilon(self) -> float:
        """ε of all training on this data after this round (what --max-epsilon bounds)."""
        if "spent" not in self._cache:
            h = (*self.dataset_history, self.entry)
            self._cache["spent"] = epsilon(h, self.delta, self.accountant)
        return self._cache["spent"]

    def report(self) -> dict[str, Any]:
        """The figures an update carries (protocol.messages.Update's dp_* fields)."""
        return {
            "dp_epsilon": min(self.session_epsilon(), MAX_REPORTED_EPSILON),
            "dp_spent_epsilon": min(self.spent_epsilon(), MAX_REPORTED_EPSILON),
            "dp_delta": self.delta,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_sample_rate": self.sample_rate,
            "dp_steps": sum(e[2] for e in self.session_history) + self.steps,
            "dp_accountant": self.accountant,
            "dp_max_epsilon": self.max_epsilon,
        }


def plan_round(
    privacy: dict[str, Any],
    train: dict[str, Any],
    rounds: int,
    n_train: int,
    *,
    session_history: Sequence[Entry] = (),
    dataset_history: Sequence[Entry] = (),
    max_epsilon: float | None = None,
    seed: int | None = None,
) -> DPRound:
    """The round's DP-SGD from a validated spec's ``[privacy]`` and ``[training]`` sections,
    the session's planned ``rounds`` and this participant's ``n_train`` training examples.
    σ is ``privacy.noise_multiplier``, or (0) the one that spends ``target_epsilon`` over
    rounds × local_epochs × batches per epoch steps."""
    if n_train < 1:
        raise SpecError("local DP-SGD needs at least one training example here")
    rate = sample_rate(n_train, train["batch_size"])
    steps = train["local_epochs"] * batches_per_epoch(n_train, train["batch_size"])
    sigma = float(privacy["noise_multiplier"])
    if sigma <= 0:
        sigma = derive_noise_multiplier(
            float(privacy["target_epsilon"]),
            float(privacy["delta"]),
            rate,
            rounds * steps,
            privacy["accountant"],
        )
    return DPRound(
        noise_multiplier=sigma,
        sample_rate=rate,
        steps=steps,
        max_grad_norm=float(privacy["max_grad_norm"]),
        delta=float(privacy["delta"]),
        accountant=privacy["accountant"],
        session_history=tuple(session_history),
        dataset_history=tuple(dataset_history),
        max_epsilon=max_epsilon,
        seed=seed,
    )


def check_module(model: torch.nn.Module, where: str) -> None:
    """Unsupported (the task is declined) for a model Opacus cannot train privately, each
    offending layer named, with the fix (BatchNorm mixes examples: use GroupNorm)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        found = "; ".join(str(e) for e in errors[:5])
        raise Unsupported(
            f"{where} has layers that local DP-SGD (Opacus) cannot train privately: {found}",
            hint="replace BatchNorm with GroupNorm (e.g. nn.GroupNorm(min(32, channels), "
            "channels)) in the model factory, or set privacy.mode to another mode",
        )


def _generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded from ``seed``, or from this machine's entropy (never a seed
    that others can compute: see the module's docstring)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "big") & (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def train_private(
    model_spec: dict[str, Any],
    weights: Weights,
    data: Dataset,
    cfg: training.TrainConfig,
    dp: DPRound,
    *,
    deadline: float | None = None,
    stop: threading.Event | None = None,
) -> training.TrainResult:
    """fednode.training.train with DP-SGD: Opacus's PrivacyEngine wraps the model, the
    optimizer and the batches (Poisson sampling), for exactly ``dp.steps`` noisy steps.
    Returns the weights under the model's own names (not GradSampleModule's ``_module.``)
    and, in ``privacy``, what this round spent (DPRound.report)."""
    from opacus import PrivacyEngine

    cfg.validate()
    start = time.perf_counter()
    began = time.monotonic()
    x, y = training._tensors(model_spec, data)
    model = training._model_from_spec(model_spec)
    check_module(model, "the model")
    training.set_weights(model, weights)
    # Opacus computes per-example gradients on the CPU or the chosen device alike
    model.to(training.DEVICE)
    model.train()
    opt = training._optimizer(model, cfg)
    task = model_spec.get("task", "classification")
    loss_fn = training._loss_fn(task)
    gen = _generator(dp.seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size, generator=gen)
    engine = PrivacyEngine(accountant=dp.accountant)
    private_model, dp_opt, dp_loader = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
        noise_generator=gen,
    )
    if not math.isclose(1.0 / len(dp_loader), dp.sample_rate, rel_tol=1e-12):
        raise AssertionError("the planned sample rate is not the one Opacus samples with")
    # FedProx: the proximal term does not depend on the data, so it is applied after each
    # private step as its own (decoupled) gradient step: clipping and noise never see it.
    anchor = [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu > 0 else None
    n = x.shape[0]
    steps = 0
    epoch_loss = 0.0
    for epoch in range(cfg.local_epochs):
        total, seen = 0.0, 0
        for xb, yb in dp_loader:
            training._check_stop(
                deadline, stop, started=began, epoch=epoch, epochs=cfg.local_epochs, steps=steps
            )
            xb, yb = xb.to(training.DEVICE), yb.to(training.DEVICE)
            dp_opt.zero_grad(set_to_none=True)
            if len(xb):
                loss = loss_fn(private_model(xb), yb)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise training.NonFiniteUpdate(
                        f"the training loss became {value} at epoch {epoch + 1} of "
                        f"{cfg.local_epochs}, step {steps + 1}; no update is sent"
                    )
                loss.backward()
                total += value * len(xb)
                seen += len(xb)
            dp_opt.step()  # an empty Poisson batch still takes a (pure noise) step
            if anchor is not None:
                with torch.no_grad():
                    for p, a in zip(model.parameters(), anchor, strict=True):
                        p.sub_(cfg.lr * cfg.proximal_mu * (p - a))
            steps += 1
        epoch_loss = total / max(seen, 1)
    if steps != dp.steps:
        raise AssertionError(f"DP-SGD took {steps} steps, {dp.steps} were accounted")
    trained = training.get_weights(model)  # the unwrapped module: the model's own names
    for name, v in trained.items():
        if not torch.isfinite(torch.from_numpy(v)).all():
            raise training.NonFiniteUpdate(
                f"the trained tensor {name!r} has non-finite values after DP-SGD; no update is sent"
            )
    return training.TrainResult(
        weights=trained,
        num_examples=int(n),
        loss=float(epoch_loss),
        duration_s=time.perf_counter() - start,
        steps=steps,
        privacy=dp.report(),
    )
