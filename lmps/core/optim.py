"""The update rule a parameter server runs on the shards it owns.

The update runs on the servers, as MXNet's KVStore `set_optimizer` does and as the
Parameter Server paper (Li et al., OSDI'14) describes: workers push gradients, the servers
own the weights and their optimizer state. The math is torch's own: `ShardOptimizer` wraps
`torch.optim.SGD` / `torch.optim.AdamW` (decoupled weight decay: Loshchilov & Hutter,
"Decoupled Weight Decay Regularization", ICLR 2019) over the server's flat fp32 shards. Both
rules are elementwise, so running them slice by slice on several servers gives the same
result as running them on the full tensors in one process. The learning rate is a pure
function of the global step (`lr_at`: linear warmup, then constant or the cosine decay of
SGDR, Loshchilov & Hutter, ICLR 2017, without restarts), so every server computes the same
value without talking to the others.

One table per fact: `OPTIMIZERS` (name -> torch constructor and the settings it takes or
refuses) and `SCHEDULES` (name -> lr after warmup) are what validation, `ShardOptimizer`,
the proto mapping (`lmps.rpc.codec`) and the CLI's choices all read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor

OptimizerKind = Literal["sgd", "adamw"]
"""Names of the update rules (keys of `OPTIMIZERS`)."""
ScheduleName = Literal["constant", "cosine"]
"""Names of the learning-rate schedules (keys of `SCHEDULES`)."""

ParamGroups = list[dict[str, Any]]


@dataclass(frozen=True)
class UpdateRule:
    """One optimizer of the registry: how to build it and which settings are its own."""

    label: str
    """Its name in messages ("SGD", "AdamW")."""
    build: Callable[[ParamGroups, float, OptimizerSettings], torch.optim.Optimizer]
    """Constructs the torch optimizer over `groups` at learning rate `lr`."""
    takes: tuple[str, ...]
    """Settings only this rule reads (the CLI sends them only for this rule)."""
    refuses: tuple[str, ...] = ()
    """Other rules' settings that must stay at their defaults here: a value would be
    silently ignored."""
    hint: str = ""
    """What to use instead of a refused setting."""
    align: int = 1
    """`ShardOptimizer` pads every shard with zeros to a multiple of this many elements, so
    that where a parameter was cut into shards cannot change the result (see `_adamw`)."""


@dataclass(frozen=True)
class Schedule:
    """One learning-rate schedule of the registry."""

    after_warmup: Callable[[OptimizerSettings, int], float]
    """The lr at global step `step` >= warmup_steps."""
    needs_total_steps: bool
    """Whether the schedule is shaped by the job's length (then total_steps must be > 0)."""


def _sgd(groups: ParamGroups, lr: float, s: OptimizerSettings) -> torch.optim.Optimizer:
    # foreach=False: torch's single-tensor kernels, the reference the parity tests compare to.
    return torch.optim.SGD(
        groups, lr=lr, momentum=s.momentum, dampening=0.0, nesterov=s.nesterov, foreach=False
    )


FUSED_ALIGN = 64
"""Elements a shard is padded to for torch's fused AdamW kernel (see `_adamw`)."""


def _adamw(groups: ParamGroups, lr: float, s: OptimizerSettings) -> torch.optim.Optimizer:
    # fused=True: torch's one-pass kernel (aten `_fused_adamw_`), 4.6x cheaper per element
    # than the single-tensor loop here (14.5 vs 66.8 ms per step for the `small` preset's
    # 13.9M fp32 parameters, one thread). It runs vector lanes over the body of each tensor
    # and a scalar loop over its last numel % lanes elements, and the two round differently
    # (FMA): an element's result would depend on where its shard was cut, and a job resumed
    # onto another number of servers would no longer be bit-exact. Every shard is therefore
    # padded with zeros to a multiple of FUSED_ALIGN (64 >= the widest lane count and a
    # multiple of the kernel's 16-float work units), so every element takes the vector path,
    # whatever the cut; a zero pad stays zero (its update is 0 / (0 + eps)).
    return torch.optim.AdamW(groups, lr=lr, betas=(s.beta1, s.beta2), eps=s.eps, fused=True)


def _constant(s: OptimizerSettings, step: int) -> float:
    return s.lr


def _cosine(s: OptimizerSettings, step: int) -> float:
    # SGDR's cosine annealing, one cycle, no restart: from lr at the end of warmup down to
    # min_lr at total_steps, and min_lr from then on.
    if step >= s.total_steps:
        return s.min_lr
    t = (step - s.warmup_steps) / (s.total_steps - s.warmup_steps)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1.0 + math.cos(math.pi * t))


OPTIMIZERS: Mapping[OptimizerKind, UpdateRule] = {
    "sgd": UpdateRule(label="SGD", build=_sgd, takes=("momentum", "nesterov")),
    "adamw": UpdateRule(
        label="AdamW",
        build=_adamw,
        align=FUSED_ALIGN,
        takes=("beta1", "beta2", "eps"),
        refuses=("momentum", "nesterov"),
        hint="use beta1 for AdamW",
    ),
}
SCHEDULES: Mapping[ScheduleName, Schedule] = {
    "constant": Schedule(after_warmup=_constant, needs_total_steps=False),
    "cosine": Schedule(after_warmup=_cosine, needs_total_steps=True),
}
KINDS: tuple[OptimizerKind, ...] = tuple(OPTIMIZERS)
SCHEDULE_NAMES: tuple[ScheduleName, ...] = tuple(SCHEDULES)
# The Literals are the types, the tables the facts: they must name the same things.
assert set(get_args(OptimizerKind)) == set(OPTIMIZERS), "OptimizerKind != OPTIMIZERS"
assert set(get_args(ScheduleName)) == set(SCHEDULES), "ScheduleName != SCHEDULES"


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def _owner(setting: str) -> UpdateRule:
    return next(rule for rule in OPTIMIZERS.values() if setting in rule.takes)


@dataclass(frozen=True)
class OptimizerRequest:
    """An update rule as asked for at submit: `total_steps` may be 0 ("open": the coordinator
    sizes it from the data and the epochs). Mirrors `lmps.v1.OptimizerConfig`.

    Only a resolved `OptimizerSettings` can run (`ShardOptimizer`, `lr_at`)."""

    # Whether a schedule that needs the job's length may leave total_steps open (0).
    _open_ok: ClassVar[bool] = True

    kind: OptimizerKind
    """"sgd" (torch.optim.SGD: momentum with dampening 0, optional Nesterov, coupled weight
    decay) or "adamw" (torch.optim.AdamW: decoupled weight decay). See `OPTIMIZERS`."""
    lr: float
    """Peak learning rate (after warmup)."""
    momentum: float = 0.0
    """SGD momentum in [0, 1); must stay 0 for AdamW."""
    nesterov: bool = False
    """SGD Nesterov momentum; needs momentum > 0."""
    weight_decay: float = 0.0
    """Weight decay, applied only to shards marked for it (weights and embeddings)."""
    beta1: float = 0.9
    """AdamW decay rate of the first moment, in [0, 1)."""
    beta2: float = 0.95
    """AdamW decay rate of the second moment, in [0, 1)."""
    eps: float = 1e-8
    """AdamW term added to the denominator; > 0."""
    schedule: ScheduleName = "constant"
    """"constant" (lr after warmup) or "cosine" (decay from lr to min_lr at total_steps).
    See `SCHEDULES`."""
    warmup_steps: int = 0
    """Steps of linear warmup: lr * (step + 1) / warmup_steps for step < warmup_steps."""
    total_steps: int = 0
    """Steps of the whole job; where the cosine schedule reaches min_lr. Required by cosine
    once resolved; 0 in a request means "the coordinator fills it in"."""
    min_lr: float = 0.0
    """Floor of the cosine schedule, in [0, lr]."""

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer kind {self.kind!r}; expected one of {KINDS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown lr schedule {self.schedule!r}; expected one of {SCHEDULE_NAMES}"
            )
        for name in ("lr", "momentum", "weight_decay", "beta1", "beta2", "eps", "min_lr"):
            _finite(name, getattr(self, name))
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        rule = OPTIMIZERS[self.kind]
        if any(getattr(self, name) != DEFAULTS[name] for name in rule.refuses):
            owners = sorted({_owner(name).label for name in rule.refuses})
            raise ValueError(
                f"{' and '.join(rule.refuses)} are {'/'.join(owners)} settings; {rule.hint}"
            )
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.warmup_steps < 0 or self.total_steps < 0:
            raise ValueError("warmup_steps and total_steps must be >= 0")
        if (
            not self._open_ok
            and SCHEDULES[self.schedule].needs_total_steps
            and self.total_steps == 0
        ):
            raise ValueError(f"the {self.schedule} schedule needs total_steps > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")

    def resolve(self, total_steps: int) -> OptimizerSettings:
        """The runnable settings: `total_steps` fills in an open (0) step count."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["total_steps"] = self.total_steps or total_steps
        return OptimizerSettings(**fields)


@dataclass(frozen=True)
class OptimizerSettings(OptimizerRequest):
    """The update rule run on the parameter servers: an `OptimizerRequest` whose schedule can
    run (total_steps > 0 where the schedule needs the job's length). Mirrors
    `lmps.v1.OptimizerConfig` as a server receives it."""

    _open_ok: ClassVar[bool] = False


DEFAULTS: Mapping[str, Any] = {
    f.name: f.default
    for f in dataclasses.fields(OptimizerRequest)
    if f.default is not dataclasses.MISSING
}
"""Each setting's default (the wire's "0 means default" resolves to these)."""


def lr_at(settings: OptimizerSettings, step: int) -> float:
    """Learning rate for global step `step` (0-based).

    Linear warmup `lr * (step + 1) / warmup_steps` while step < warmup_steps; then the
    schedule's value: `lr` (constant), or for cosine `min_lr + (lr - min_lr) * (1 + cos(pi * t))
    / 2` with t = (step - warmup_steps) / (total_steps - warmup_steps), and `min_lr` from
    total_steps on. Warmup wins when it is longer than the job.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    s = settings
    if SCHEDULES[s.schedule].needs_total_steps and s.total_steps == 0:
        raise ValueError(f"the {s.schedule} schedule needs total_steps > 0 (still open)")
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    return SCHEDULES[s.schedule].after_warmup(s, step)


class ShardOptimizer:
    """The registry's torch optimizer (SGD / AdamW) over one server's flat fp32 shards, keyed
    by shard id.

    Two param groups: shards with weight decay, and the rest with weight_decay 0. SGD runs
    torch's single-tensor kernel (`foreach=False`); AdamW the fused one, over shards padded
    to `UpdateRule.align` elements (internal: `values`, `state_dict` and the gradients taken
    are the shards' own sizes). Both give the same result however the parameters are cut.
    """

    def __init__(
        self,
        shards: Mapping[str, Tensor],
        *,
        decay: Mapping[str, bool],
        settings: OptimizerSettings,
    ) -> None:
        if set(decay) != set(shards):
            missing, extra = sorted(set(shards) - set(decay)), sorted(set(decay) - set(shards))
            raise ValueError(f"decay flags: missing {missing}, unexpected {extra}")
        for sid, t in shards.items():
            if t.dim() != 1 or t.dtype != torch.float32:
                raise ValueError(
                    f"shard {sid!r} must be a 1-D float32 tensor, got {t.dtype} {tuple(t.shape)}"
                )
        self._settings = settings
        align = OPTIMIZERS[settings.kind].align
        self._numel = {sid: t.numel() for sid, t in shards.items()}
        # Own copies (padded with zeros to `align`): the optimizer needs leaf tensors and
        # updates them in place, which must not reach into the caller's (e.g. a decoded wire
        # buffer's) memory.
        self._params: dict[str, Tensor] = {}
        for sid, t in shards.items():
            n = t.numel()
            p = t.new_zeros(-(-n // align) * align)
            p[:n].copy_(t.detach())
            self._params[sid] = p
        # torch numbers params by position across groups in its state_dict; `_order` maps
        # those positions back to shard ids.
        decayed = [sid for sid in self._params if decay[sid]]
        plain = [sid for sid in self._params if not decay[sid]]
        self._order: list[str] = decayed + plain
        groups: list[dict[str, Any]] = [
            {"params": [self._params[s] for s in decayed], "weight_decay": settings.weight_decay},
            {"params": [self._params[s] for s in plain], "weight_decay": 0.0},
        ]
        self._optimizer = OPTIMIZERS[settings.kind].build(groups, lr_at(settings, 0), settings)

    @property
    def settings(self) -> OptimizerSettings:
        """The update rule this optimizer was built with."""
        return self._settings

    @property
    def values(self) -> dict[str, Tensor]:
        """The live master values by shard id (updated in place by `step`; do not write)."""
        return {sid: p[: self._numel[sid]] for sid, p in self._params.items()}

    def _check_ids(self, what: str, ids: Iterable[str], partial: bool) -> None:
        """ValueError unless `ids` are exactly the shard ids (`partial`: some of them)."""
        given = set(ids)
        missing = [] if partial else sorted(set(self._params) - given)
        extra = sorted(given - set(self._params))
        if missing or extra:
            raise ValueError(f"{what}: missing {missing}, unexpected {extra}")

    def assign(self, values: Mapping[str, Tensor], *, partial: bool = False) -> None:
        """Overwrite the master values with `values` (one per shard, any float dtype), keeping
        the optimizer state: a worker's inner optimizer starts each local-steps round from
        the global parameters with the moments it built in the rounds before (DiLoCo).
        `partial`: `values` may be some of the shards (streaming fragments: one fragment's
        new global values); the others keep theirs.

        Raises ValueError, changing nothing, unless `values` has exactly the shard ids (some
        of them with `partial`), each with the shard's number of elements."""
        self._check_ids("values", values, partial)
        for sid, v in values.items():
            if v.numel() != self._numel[sid] or not v.is_floating_point():
                raise ValueError(
                    f"value of {sid!r}: expected {self._numel[sid]} float elements, "
                    f"got {v.dtype} {tuple(v.shape)}"
                )
        with torch.no_grad():
            for sid, v in values.items():
                self._params[sid][: self._numel[sid]].copy_(v.reshape(-1))

    def step(self, grads: Mapping[str, Tensor], step: int, *, partial: bool = False) -> None:
        """Apply one update with `grads` (one per shard) at the lr of global step `step`.
        `partial`: `grads` may be some of the shards (streaming fragments: one fragment's
        outer step); the others are left exactly as they are, values and state (torch's
        SGD and AdamW skip a parameter without a gradient: no decay, no moment update).

        Raises ValueError, changing nothing, unless `grads` has exactly the shard ids (some
        of them with `partial`), each with the shard's number of elements and a floating
        dtype (cast to float32).
        """
        self._check_ids("gradients", grads, partial)
        for sid, g in grads.items():
            if g.numel() != self._numel[sid] or not g.is_floating_point():
                raise ValueError(
                    f"gradient of {sid!r}: expected {self._numel[sid]} float elements, got "
                    f"{g.dtype} {tuple(g.shape)}"
                )
        lr = lr_at(self._settings, step)
        for sid, p in self._params.items():
            if sid not in grads:
                continue  # partial: grad None, skipped by the step
            g = grads[sid].detach().reshape(-1)
            if g.numel() == p.numel():
                p.grad = g.to(dtype=p.dtype, device=p.device)
            else:  # padded: the pad's gradient is zero
                p.grad = p.new_zeros(p.shape)
                p.grad[: g.numel()].copy_(g)
        for group in self._optimizer.param_groups:
            group["lr"] = lr
        with torch.no_grad():
            self._optimizer.step()
        # Drop the gradients: keeping them would hold a shard-sized buffer per shard for nothing.
        self._optimizer.zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held (momentum buffers, Adam moments, step counters)."""
        return sum(
            v.numel() * v.element_size()
            for st in self._optimizer.state.values()
            for v in st.values()
            if isinstance(v, Tensor)
        )

    def shard_state_bytes(self) -> dict[str, int]:
        """`state_bytes` by shard id, for every shard (0 where it holds no state yet)."""
        state = self._optimizer.state
        return {
            sid: sum(
                v.numel() * v.element_size()
                for v in state.get(p, {}).values()
                if isinstance(v, Tensor)
            )
            for sid, p in self._params.items()
        }

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Optimizer state by shard id (copies, safe to keep while training goes on).

        Empty before the first step, and always for SGD without momentum.
        """
        return {
            sid: {k: self._unpad(sid, v) for k, v in st.items()}
            for sid in self._order
            if (st := self._optimizer.state.get(self._params[sid]))
        }

    def _unpad(self, sid: str, v: Any) -> Any:
        """A copy of state value `v` of shard `sid` at the shard's own size."""
        if not isinstance(v, Tensor):
            return v
        if v.dim() == 1 and v.numel() == self._params[sid].numel():
            return v.detach()[: self._numel[sid]].clone()
        return v.detach().clone()

    def _pad(self, sid: str, v: Any) -> Any:
        """A copy of saved state value `v` of shard `sid` at the padded size."""
        if not isinstance(v, Tensor):
            return v
        n, padded = self._numel[sid], self._params[sid].numel()
        if v.dim() == 1 and v.numel() == n and padded != n:
            out = v.new_zeros(padded)
            out[:n].copy_(v)
            return out
        return v.clone()

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Restore state saved by `state_dict` for the same shards and settings.

        `state` must be empty (fresh state) or hold every shard id; tensors shaped like a
        shard must match its size. Raises ValueError, changing nothing, otherwise.
        """
        if state and set(state) != set(self._params):
            missing = sorted(set(self._params) - set(state))
            extra = sorted(set(state) - set(self._params))
            raise ValueError(f"optimizer state: missing {missing}, unexpected {extra}")
        for sid, st in state.items():
            n = self._numel[sid]
            for k, v in st.items():
                if isinstance(v, Tensor) and v.dim() > 0 and tuple(v.shape) != (n,):
                    raise ValueError(
                        f"state {k!r} of {sid!r} has shape {tuple(v.shape)}, not ({n},)"
                    )
        # torch's own loader casts and places the tensors like the params; it wants its
        # positional ids and the current param groups (the lr is reset by every step anyway).
        current = self._optimizer.state_dict()
        self._optimizer.load_state_dict(
            {
                "state": {
                    # Copies (padded) so later steps do not write into the caller's checkpoint.
                    i: {k: self._pad(sid, v) for k, v in state[sid].items()}
                    for i, sid in enumerate(self._order)
                    if sid in state
                },
                "param_groups": current["param_groups"],
            }
        )
