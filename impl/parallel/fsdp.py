"""FSDP2 for the causal DiT: parameters, gradients and AdamW state sharded over every rank.

Mesh: the 2-D ``(dp, sp)`` device mesh of :mod:`impl.parallel.groups` (an SP group is a row
of consecutive ranks), flattened into one ``dp_sp`` dimension that FSDP shards over, as
torchtitan composes FSDP with context parallelism. The ranks of an SP group hold different
shards of the same parameters, so SP cuts parameter, gradient and optimizer memory as much
as DP does; a world of W ranks keeps 1/W of them per rank.

Units (one all-gather in forward, one reduce-scatter in backward each), bottom-up:

- per layer, the cross-attention text projections ``attn2.{to_k, norm_k, to_v}``: the model
  runs them from :meth:`CausalWanDiT.encode_text`, before and outside the block's forward,
  so they form their own (grouped) unit whose hooks fire on those modules' own forwards;
- per layer, the rest of the block (resharded after forward, re-gathered for the backward /
  the checkpoint recompute);
- the root: patch embedding, condition embedder, head; ``encode_text`` is registered as a
  root forward method so the text embedder is gathered when the trainer calls it.

Mixed precision: the sharded parameters ARE the master weights (float32 for a bf16 or fp32
run, float64 for fp64, so the float64 exactness tests never round); they are all-gathered in
the compute dtype and gradients are reduce-scattered in the master dtype
(``MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=master)``, ``param_dtype=None``
when the two agree). Forward inputs are not cast: timesteps and RoPE tables stay in full
precision exactly as on the replicated path.

Gradients follow :mod:`impl.parallel.gradients`: the reduce-scatter sums over all dp*sp
ranks and divides by the DP size, so every rank holds its shard of the gradient that the
replicated trainer would hold in full.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy,
                                    fully_shard, register_fsdp_forward_method)
from torch.distributed.tensor import DTensor

from impl.parallel.gradients import gradient_divide_factor
from impl.parallel.groups import ParallelConfigError, ParallelGroups

# FSDP2 warns when a unit returns a view (the text projections' head split, the model's
# un-patchify): an in-place op on such a view would skip its pre-backward hook. Nothing in
# the model or the loss writes into these outputs in place, and the exactness tests
# (tests/test_fsdp.py) would catch a skipped all-gather, so the warning is noise here.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


@dataclass(frozen=True)
class FSDPPlan:
    """How a model was sharded: what the optimizer, clipping and checkpoints need to know."""

    mesh: DeviceMesh            # the flattened dp*sp mesh FSDP shards over
    compute_dtype: torch.dtype  # all-gathered parameters, activations
    master_dtype: torch.dtype   # sharded parameters (= optimizer master weights), gradients
    offload: bool               # shards (params, grads, AdamW state) on the CPU
    divide_factor: int          # gradients: world sum / this (the DP size)

    @property
    def group(self) -> dist.ProcessGroup:
        return self.mesh.get_group()

    @property
    def comm_device(self) -> torch.device:
        """Where tensors must be for this mesh's collectives (NCCL: CUDA, gloo: CPU)."""
        return torch.device(self.mesh.device_type)


def build_mesh(groups: ParallelGroups, device: torch.device | str) -> DeviceMesh:
    """The flattened ``dp_sp`` mesh of the initialised default group (collective).

    The 2-D mesh is ``arange(world).view(dp, sp)``: its ``sp`` rows are exactly the SP groups
    of :func:`impl.parallel.groups.build_groups`, which this checks.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ParallelConfigError("sharding: 'fsdp' needs torch.distributed to be initialised (torchrun, or "
                                  "impl.parallel.groups.init_single_rank_group() for one process)")
    world = dist.get_world_size()
    if groups.world_size != world or groups.dp_size * groups.sp_size != world:
        raise ParallelConfigError(f"sp_size: the process groups describe {groups.dp_size} x {groups.sp_size} "
                                  f"ranks but the world has {world}")
    kind = torch.device(device).type
    mesh2d = init_device_mesh(kind, (groups.dp_size, groups.sp_size), mesh_dim_names=("dp", "sp"))
    if mesh2d["sp"].get_local_rank() != groups.sp_rank or mesh2d["dp"].get_local_rank() != groups.dp_rank:
        raise ParallelConfigError("sp_size: the device mesh and the SP/DP process groups disagree on this "
                                  f"rank's position (rank {groups.rank})")
    return mesh2d["dp", "sp"]._flatten("dp_sp")


def master_dtype_for(compute_dtype: torch.dtype) -> torch.dtype:
    """The sharded (master) dtype of a run computing in ``compute_dtype``."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def mixed_precision(compute_dtype: torch.dtype, master_dtype: torch.dtype) -> MixedPrecisionPolicy:
    same = compute_dtype == master_dtype
    return MixedPrecisionPolicy(param_dtype=None if same else compute_dtype,
                                reduce_dtype=None if same else master_dtype, cast_forward_inputs=False)


def _to_master(module: nn.Module, master_dtype: torch.dtype) -> None:
    """Trainable parameters of ``module`` in the master dtype (frozen ones stay as they are)."""
    for p in module.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != master_dtype:
            p.data = p.data.to(master_dtype)


def _text_projections(block: nn.Module) -> list[nn.Module]:
    a = block.attn2
    return [a.to_k, a.norm_k, a.to_v]


def _shard(model: nn.Module, groups: ParallelGroups, device: torch.device | str, offload: bool,
           compute_dtype: torch.dtype) -> FSDPPlan:
    if isinstance(model, FSDPModule):
        raise ValueError("shard_model: the model is already sharded")
    device = torch.device(device)
    master = master_dtype_for(compute_dtype)
    mesh = build_mesh(groups, device)
    mp = mixed_precision(compute_dtype, master)
    policy: OffloadPolicy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=policy)
    for block in model.blocks:     # cast one block at a time: the float32 copy never exists whole
        _to_master(block, master)
        fully_shard(_text_projections(block), **kw)
        fully_shard(block, **kw)
    _to_master(model, master)
    fully_shard(model, **kw)
    register_fsdp_forward_method(model, "encode_text")
    factor = gradient_divide_factor(groups)
    # A custom divide factor becomes NCCL's PREMUL_SUM for float32 / BF16 gradients; gloo has
    # no such op, so there FSDP sums and divides in separate steps.
    sum_only = dist.get_backend(mesh.get_group()) != "nccl"
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(float(factor))
            m.set_force_sum_reduction_for_comms(sum_only)
    return FSDPPlan(mesh, compute_dtype, master, offload, factor)


def shard_model(model: nn.Module, groups: ParallelGroups, device: torch.device | str, *,
                offload: bool = False) -> FSDPPlan:
    """Shard a training DiT in place (see the module docstring). Its parameters must all be
    in the compute dtype, as :func:`impl.train.trainer.build_training_model` builds them
    (quantized block linears keep their BF16 master weight as a parameter, so they shard
    like plain linears). Read ``model.dtype`` before: afterwards, outside a forward, the
    registered parameters are the float32 shards."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        raise ValueError(f"shard_model: expected one parameter dtype, found {sorted(map(str, dtypes))}")
    return _shard(model, groups, device, offload, dtypes.pop())


def shard_for_lora(model: nn.Module, groups: ParallelGroups, device: torch.device | str, *,
                   compute_dtype: torch.dtype | None = None, offload: bool = False) -> FSDPPlan:
    """Shard a LoRA-carrying DiT (``impl.model.lora.add_lora``) or a frozen one (a DMD
    teacher) with the same units as :func:`shard_model`. The frozen base weights, the
    memory that matters, are sharded in the compute dtype (no master copy: they never
    change); the trainable LoRA tensors are sharded as float32 masters with float32
    gradients. Train with :class:`impl.train.optim.ShardedAdamW` over
    ``impl.model.lora.trainable_parameters(model)``; save with :func:`gather_lora_state_dict`.
    """
    if compute_dtype is None:
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
        if len(frozen) != 1:
            raise ValueError(f"shard_for_lora: pass compute_dtype; frozen parameters have {sorted(map(str, frozen))}")
        compute_dtype = frozen.pop()
    return _shard(model, groups, device, offload, compute_dtype)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float | None, plan: FSDPPlan) -> float:
    """The global L2 norm of the sharded gradients (before clipping), clipping them to
    ``max_norm`` as ``torch.nn.utils.clip_grad_norm_`` does (coefficient max_norm / (norm +
    1e-6), only when below 1). Each rank squares its own shards (the shards of the mesh are
    disjoint, padding excluded) and one all-reduce sums them, in float64 on the mesh's
    communication device, which also works when the shards live on the CPU (offload)."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    sums: dict[torch.device, torch.Tensor] = {}   # accumulated where the shards live, moved once
    for g in grads:
        sq_g = torch.linalg.vector_norm(g.detach(), 2, dtype=torch.float64).square()
        sums[g.device] = sums[g.device] + sq_g if g.device in sums else sq_g
    sq = torch.zeros((), dtype=torch.float64, device=plan.comm_device)
    for part in sums.values():
        sq += part.to(sq.device)
    dist.all_reduce(sq, group=plan.group)
    norm = float(sq.sqrt())
    if max_norm is not None:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return norm


def full_tensors(tensors: dict[str, torch.Tensor], *, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Gather named (sharded) tensors one at a time (collective), as CPU tensors; with
    ``rank0_only`` the other ranks return an empty dict (and keep no copies)."""
    keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    out = {}
    for name, t in tensors.items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            out[name] = full.detach().cpu().clone()
        del full
    return out


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on rank 0's CPU, empty elsewhere (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``impl.model.lora.lora_state_dict`` of a sharded model as full CPU tensors on every
    rank (collective). ``save_lora`` reads ``lora_state_dict(model)`` itself, which are
    shards here; docs/training.md names the one-line change it needs for sharded models."""
    from impl.model.lora import lora_state_dict

    return full_tensors(lora_state_dict(model), rank0_only=False)
