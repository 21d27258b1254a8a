"""A model replica whose parameters are filled from, and whose gradients are cut into, shards.

Pure torch: no gRPC here. Runs on CPU or CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import torch

from lmps.core import tasks
from lmps.core.model import GPT, GPTConfig
from lmps.core.partition import ParamInfo, Shard, shard_view, validate_cover
from lmps.core.tasks import EvalCounts, Task, TaskName


class Arrivals(Protocol):
    """Shards still on their way (a pull in flight, `services/worker/pulls.py`)."""

    def wait(self, shard_ids: Iterable[str]) -> None:
        """Until every one of `shard_ids` is loaded; raises the pull's error."""
        ...


def pick_device(requested: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; anything else is taken literally."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no CUDA device")
    return device


class Replica:
    """One worker's copy of the model, trained on one job's `task`.

    `micro_batches` > 1 is gradient accumulation: a batch runs as that many equal slices,
    each one's mean loss weighted by its share of the batch's loss units, so the summed
    gradient is the whole batch's mean gradient (up to rounding) in a fraction of the
    activation memory. `autocast` bfloat16 runs forward and backward under torch.autocast:
    bf16 matmuls, fp32 parameters and gradients (the servers' masters stay fp32).
    `freeze_backbone` trains the classification head only: the other parameters get no
    gradient computed and push zeros (which, with no weight decay on them, leave the servers'
    values exactly as they are; `lmps.core.tasks.decay_rule`).
    """

    def __init__(
        self,
        config: GPTConfig,
        shards: Sequence[Shard],
        device: torch.device,
        *,
        task: TaskName = "lm",
        micro_batches: int = 1,
        autocast: torch.dtype = torch.float32,
        freeze_backbone: bool = False,
    ) -> None:
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.config = config
        self.device = device
        self.task: Task = tasks.task(task)
        self.micro_batches = micro_batches
        self.autocast = autocast
        decays = tasks.decay_rule(freeze_backbone)
        # Check the map on a weightless model first: a bad request must cost no memory.
        with torch.device("meta"):
            meta = GPT(config).named_parameters()
            infos = [ParamInfo(n, tuple(p.shape), decays(n, p)) for n, p in meta]
        validate_cover(shards, infos)  # ValueError if the map doesn't cover the model exactly
        # Values are overwritten by the first pull, so init cost is all we care about here.
        self.model = GPT(config).to(device)
        self.params = dict(self.model.named_parameters())
        for name, p in self.params.items():
            p.requires_grad_(tasks.trainable(name, freeze_backbone))
        self.shards = {s.shard_id: s for s in shards}
        self._zeros: dict[str, torch.Tensor] = {}  # frozen shard -> its (CPU) zero gradient
        # Backward hands each parameter's shards to `_on_grad` (set during `train_step`) the
        # moment its gradient is final, so they can be pushed while backward goes on.
        self._of_param: dict[str, list[Shard]] = {}
        for s in shards:
            self._of_param.setdefault(s.param, []).append(s)
        self._on_grad: Callable[[str, torch.Tensor], None] | None = None
        self._given: set[str] = set()
        for name, p in self.params.items():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p, name=name: self._give(name, p))
        # And forward waits, module by module, only for the shards of that module's own
        # parameters (`train_step(arrivals=)`): the next step's first layers start while
        # the later ones are still being pulled.
        self._arrivals: Arrivals | None = None
        name_of = {id(p): n for n, p in self.params.items()}
        for module in self.model.modules():
            own = [name_of[id(p)] for p in module.parameters(recurse=False)]
            ids = tuple(s.shard_id for n in own for s in self._of_param.get(n, ()))
            if ids:
                module.register_forward_pre_hook(lambda m, args, ids=ids: self._await(ids))

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def load(self, values: Mapping[str, torch.Tensor]) -> None:
        """Write every shard's value into the parameters (H2D copies on CUDA)."""
        if values.keys() != self.shards.keys():
            raise ValueError("pulled shards do not match the shard map")
        with torch.no_grad():
            for sid, value in values.items():
                s = self.shards[sid]
                shard_view(self.params[s.param].data, s).copy_(value, non_blocking=True)

    def load_one(self, shard_id: str, value: torch.Tensor) -> None:
        """Write one shard's value into its parameter (a pull's sink: called from the
        pull's threads while forward runs on the layers already loaded)."""
        s = self.shards.get(shard_id)
        if s is None:
            raise ValueError(f"pulled shard {shard_id!r} is not in the shard map")
        with torch.no_grad():
            shard_view(self.params[s.param].data, s).copy_(value, non_blocking=True)

    def _await(self, shard_ids: tuple[str, ...]) -> None:
        if self._arrivals is not None:
            self._arrivals.wait(shard_ids)

    def _grad_of(self, s: Shard) -> torch.Tensor:
        g = self.params[s.param].grad
        if g is None:  # frozen (or unused by the task): its gradient is zero
            zeros = self._zeros.get(s.shard_id)
            if zeros is None:
                zeros = self._zeros[s.shard_id] = torch.zeros(s.numel)
            return zeros
        view = shard_view(g, s).detach()
        return view if view.device.type == "cpu" else view.to("cpu")

    def _give(self, name: str, p: torch.Tensor) -> None:
        if self._on_grad is None:
            return
        for s in self._of_param.get(name, ()):
            self._given.add(s.shard_id)
            self._on_grad(s.shard_id, self._grad_of(s))

    def _autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.autocast == torch.bfloat16
        )

    def train_step(
        self,
        batch: torch.Tensor,
        on_grad: Callable[[str, torch.Tensor], None] | None = None,
        arrivals: Arrivals | None = None,
    ) -> tuple[float, dict[str, torch.Tensor]]:
        """Forward/backward on `batch` (B, T+1) rows of the task -> (mean loss, shard grads
        on CPU). With `arrivals` (a pull still loading the parameters through `load_one`),
        each module's forward first waits for its own shards.

        On CPU the shard gradients are views of the parameters' .grad buffers (no copy: the
        push encodes from them). Each step's .grad tensors are new (`zero_grad(set_to_none)`:
        autograd hands its result over instead of adding it into zeroed buffers, two passes
        over every gradient fewer), so a view stays valid as long as it is held. `on_grad`
        gets every shard's gradient once, as soon as backward has made it (reverse layer
        order, during the last micro-batch's backward; any left out comes after it)."""
        self.model.train()
        rows = batch.to(self.device, non_blocking=True)
        if rows.shape[0] % self.micro_batches:
            raise ValueError(
                f"a batch of {rows.shape[0]} rows does not split into {self.micro_batches} "
                "micro-batches"
            )
        parts = rows.chunk(self.micro_batches) if self.micro_batches > 1 else (rows,)
        units = [self.task.units(p) for p in parts]
        total = sum(units)
        self.model.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for k, part in enumerate(parts):
            self._arrivals = arrivals if k == 0 else None  # later slices find them loaded
            try:
                with self._autocast():
                    loss = self.task.loss(self.model, part)
            finally:
                self._arrivals = None
            # Each slice's mean, weighted by its share: the sum is the batch's mean. One slice
            # is weighted by exactly 1.0, so the whole batch at once is unchanged.
            share = units[k] / total if total else 1.0 / len(parts)
            last = k == len(parts) - 1
            self._on_grad, self._given = (on_grad if last else None), set()
            try:
                (loss * share if len(parts) > 1 else loss).backward()
            finally:
                self._on_grad = None
            loss_sum += float(loss.detach()) * share
        grads = {sid: self._grad_of(s) for sid, s in self.shards.items()}
        if on_grad is not None:
            for sid in grads.keys() - self._given:
                on_grad(sid, grads[sid])
        return loss_sum, grads

    @torch.no_grad()
    def evaluate(self, rows: torch.Tensor, batch_size: int = 32) -> EvalCounts:
        """The task's loss sum, units and (classify) confusion counts over `rows` (N, T+1)."""
        self.model.eval()
        counts: EvalCounts | None = None
        for i in range(0, rows.shape[0], batch_size):
            part = rows[i : i + batch_size].to(self.device)
            with self._autocast():
                got = self.task.evaluate(self.model, part)
            counts = got if counts is None else counts.plus(got)
        if counts is None:  # no rows
            n = self.config.num_labels
            confusion = (
                torch.zeros(n, n, dtype=torch.long)
                if isinstance(self.task, tasks.Classification)
                else None
            )
            counts = EvalCounts(0.0, 0, confusion)
        return counts
