"""A model replica whose parameters are filled from, and whose gradients are cut into, shards.

Pure torch: no gRPC here. Runs on CPU or CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from lmps.core.model import GPT, GPTConfig, decay_mask
from lmps.core.partition import ParamInfo, Shard, shard_view, validate_cover


def pick_device(requested: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; anything else is taken literally."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no CUDA device")
    return device


class Replica:
    def __init__(self, config: GPTConfig, shards: Sequence[Shard], device: torch.device) -> None:
        self.config = config
        self.device = device
        # Check the map on a weightless model first: a bad request must cost no memory.
        with torch.device("meta"):
            meta = GPT(config).named_parameters()
            infos = [ParamInfo(n, tuple(p.shape), decay_mask(n, p)) for n, p in meta]
        validate_cover(shards, infos)  # ValueError if the map doesn't cover the model exactly
        # Values are overwritten by the first pull, so init cost is all we care about here.
        self.model = GPT(config).to(device)
        self.params = dict(self.model.named_parameters())
        self.shards = {s.shard_id: s for s in shards}
        # Backward hands each parameter's shards to `_on_grad` (set during `train_step`) the
        # moment its gradient is final, so they can be pushed while backward goes on.
        self._of_param: dict[str, list[Shard]] = {}
        for s in shards:
            self._of_param.setdefault(s.param, []).append(s)
        self._on_grad: Callable[[str, torch.Tensor], None] | None = None
        self._given: set[str] = set()
        for name, p in self.params.items():
            p.register_post_accumulate_grad_hook(lambda p, name=name: self._give(name, p))

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

    def _grad_of(self, s: Shard) -> torch.Tensor:
        g = self.params[s.param].grad
        assert g is not None
        view = shard_view(g, s).detach()
        return view if view.device.type == "cpu" else view.to("cpu")

    def _give(self, name: str, p: torch.Tensor) -> None:
        if self._on_grad is None:
            return
        for s in self._of_param.get(name, ()):
            self._given.add(s.shard_id)
            self._on_grad(s.shard_id, self._grad_of(s))

    def train_step(
        self,
        batch: torch.Tensor,
        on_grad: Callable[[str, torch.Tensor], None] | None = None,
    ) -> tuple[float, dict[str, torch.Tensor]]:
        """Forward/backward on `batch` (B, T+1) int tokens -> (mean loss, shard grads on CPU).

        On CPU the shard gradients are views of the parameters' .grad buffers (no copy: the
        push encodes from them), valid until the next `train_step` zeroes them. `on_grad`
        gets every shard's gradient once, as soon as backward has made it (reverse layer
        order; any backward left out comes after it)."""
        self.model.train()
        tokens = batch.to(self.device, dtype=torch.long, non_blocking=True)
        x, y = tokens[:, :-1], tokens[:, 1:]  # (B, T) inputs and next-token targets
        self.model.zero_grad(set_to_none=False)
        _, loss = self.model(x, y)
        assert loss is not None
        self._on_grad, self._given = on_grad, set()
        try:
            loss.backward()
        finally:
            self._on_grad = None
        grads = {sid: self._grad_of(s) for sid, s in self.shards.items()}
        if on_grad is not None:
            for sid in grads.keys() - self._given:
                on_grad(sid, grads[sid])
        return float(loss.detach()), grads

    @torch.no_grad()
    def evaluate(self, sequences: torch.Tensor, batch_size: int = 32) -> tuple[float, int]:
        """Sum of token cross-entropies and token count over `sequences` (N, T+1)."""
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, sequences.shape[0], batch_size):
            tokens = sequences[i : i + batch_size].to(self.device, dtype=torch.long)
            x, y = tokens[:, :-1], tokens[:, 1:]
            _, loss = self.model(x, y)
            assert loss is not None
            total += float(loss) * y.numel()
            count += y.numel()
        return total, count
