"""AdamW over full-precision master weights, replicated or sharded.

:class:`MasterWeightAdamW` (sharding none): low-precision (BF16) parameters run the forward
and backward; the optimizer keeps a float32 master copy of each, applies AdamW there and
writes the rounded result back, so small updates are not lost to BF16 rounding. Parameters
that are already float32/float64 are their own master (no copy).

:class:`ShardedAdamW` (sharding fsdp): FSDP's sharded parameters already are the float32
masters (it all-gathers them in BF16 for compute), so a plain ``torch.optim.AdamW`` steps
them directly (fused AdamW); each rank updates its shard, clipping uses the norm over all
shards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch

if TYPE_CHECKING:
    from impl.parallel.fsdp import FSDPPlan

_FULL = (torch.float32, torch.float64)


class MasterWeightAdamW:
    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], *, lr: float,
                 betas: tuple[float, float], weight_decay: float, eps: float = 1e-8):
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.master: list[torch.Tensor] = []
        for name, p in named_params:
            if not p.requires_grad:
                continue
            self.names.append(name)
            self.params.append(p)
            m = p if p.dtype in _FULL else p.detach().float().clone().requires_grad_(True)
            self.master.append(m)
        if not self.params:
            raise ValueError("MasterWeightAdamW: no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.master, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)

    def zero_grad(self) -> None:
        for p, m in zip(self.params, self.master):
            p.grad = None
            m.grad = None

    def _gather_grads(self) -> None:
        for p, m in zip(self.params, self.master):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.to(m.dtype)

    @torch.no_grad()
    def step(self, max_grad_norm: float | None) -> float:
        """Clip (if ``max_grad_norm``) and step; returns the gradient norm before clipping."""
        self._gather_grads()
        grads = [m for m in self.master if m.grad is not None]
        if max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(grads, max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m.grad) for m in grads]))
        self.optimizer.step()
        for p, m in zip(self.params, self.master):
            if m is not p:
                p.copy_(m)
        self.zero_grad()
        return float(norm)

    def master_state(self) -> dict[str, torch.Tensor]:
        return {n: m.detach() for n, m in zip(self.names, self.master)}

    @torch.no_grad()
    def load_master_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"checkpoint lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for n, p, m in zip(self.names, self.params, self.master):
            m.copy_(state[n])
            if m is not p:
                p.copy_(m)

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """AdamW state as flat named tensors (safetensors-friendly)."""
        out = {}
        for i, n in enumerate(self.names):
            st = self.optimizer.state.get(self.master[i], {})
            for key, value in st.items():
                out[f"{n}::{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        return out

    def load_optimizer_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, n in enumerate(self.names):
            st = {key.split("::", 1)[1]: t for key, t in tensors.items() if key.split("::", 1)[0] == n}
            if st:
                m = self.master[i]
                self.optimizer.state[m] = {k: (v.to(m.device) if k != "step" else v.float())
                                           for k, v in st.items()}


class ShardedAdamW:
    """AdamW on FSDP-sharded master parameters (DTensors; on the CPU with offload)."""

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], plan: "FSDPPlan", *, lr: float,
                 betas: tuple[float, float], weight_decay: float, eps: float = 1e-8):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        if not named:
            raise ValueError("ShardedAdamW: no trainable parameters")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.plan = plan
        # Fused: one kernel per step on CUDA and a vectorised loop on the CPU (offload), with no
        # foreach temporary the size of the shards (train_memory counts none).
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps,
                                           fused=True)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, max_grad_norm: float | None) -> float:
        """Clip (if ``max_grad_norm``) by the global norm and step; returns the norm before
        clipping (the same on every rank)."""
        from impl.parallel.fsdp import clip_grad_norm_

        norm = clip_grad_norm_(self.params, max_grad_norm, self.plan)
        self.optimizer.step()
        self.zero_grad()
        return norm

    def master_state(self) -> dict[str, torch.Tensor]:
        """Name -> this rank's master shard (a DTensor: EMA and checkpoints keep it sharded)."""
        return {n: p.detach() for n, p in zip(self.names, self.params)}


class EMA:
    """Exponential moving average of the master weights (float32, on ``device``). Given
    FSDP's sharded masters it stays sharded the same way (DTensors, 1/W per rank)."""

    def __init__(self, master: dict[str, torch.Tensor], decay: float, device: torch.device | str | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay: must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: t.detach().to(device=device or t.device, dtype=torch.float32 if t.dtype != torch.float64
                                        else torch.float64).clone() for n, t in master.items()}

    @torch.no_grad()
    def update(self, master: dict[str, torch.Tensor]) -> None:
        for n, s in self.shadow.items():
            s.lerp_(master[n].to(device=s.device, dtype=s.dtype), 1.0 - self.decay)
