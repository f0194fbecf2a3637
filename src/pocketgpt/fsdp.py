"""--parallel fsdp: FSDP2 (torch.distributed.fsdp.fully_shard), each rank holding a share of every weight.

With DDP every rank keeps the whole model, its gradients and its optimizer state; with FSDP each rank keeps
1 / world of each (a DTensor sharded along its first dimension), gathers a block's weights just before
that block runs and frees them after, and reduce-scatters the gradients (averaged over the ranks) so
each rank updates its own share. Sharded per transformer block, then the root (embeddings, final norm,
head: the tied wte / lm_head matrix is one parameter of the root, so it stays one), on an explicit 1-D
device mesh over every rank.

What FSDP cannot do here is refused before anything starts (check): Muon, which orthogonalises whole
matrices and would see only a rank's rows; LoRA (a frozen base and merged copies are not wired to the
shards); float16, whose gradient scaler would decide to skip a step on each rank's shard alone.

Checkpoints are the plain run's files, not torch.distributed.checkpoint: DCP's FileSystemReader reads its
.metadata with pickle.load, and nothing in pocketgpt loads pickles. So the ranks gather the full weights
and optimizer state to rank 0 (one tensor at a time, on the CPU), which writes last/ and the best
model.safetensors exactly as a single process does; on resume every rank reads those files and keeps its
own slice. A checkpoint therefore does not know how it was sharded: it resumes on any world size, under
fsdp, ddp or one process, and sample / eval / export read it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .distributed import FollowedError, Group
from .errors import PocketError
from .model import GPT
from .runtime import Runtime


def check(cfg: TrainConfig) -> None:
    """Refuse, before any process group, what --parallel fsdp cannot train (whatever the world size, so a
    config that works on one process works on several)."""
    if cfg.run.parallel != "fsdp":
        return
    if cfg.optim.optimizer == "muon":
        raise FollowedError("--parallel fsdp cannot use optimizer muon: Muon orthogonalises whole matrices and "
                            "FSDP gives each rank only some of their rows; use --optimizer adamw with fsdp, or "
                            "--parallel ddp to keep Muon")
    if cfg.optim.ema_decay:
        raise FollowedError("--parallel fsdp does not keep an average of the weights (each rank holds only shards "
                            "of them); drop --ema-decay or use --parallel ddp")
    if cfg.lora.enabled:
        raise FollowedError("--parallel fsdp does not train LoRA adapters (the frozen base is small next to what "
                            "FSDP is for); use --parallel ddp (or auto) with LoRA")


def check_dtype(cfg: TrainConfig, runtime: Runtime) -> None:
    """Refuse float16 under --parallel fsdp, once the dtype (maybe "auto") is resolved."""
    if cfg.run.parallel == "fsdp" and runtime.needs_grad_scaler:
        raise FollowedError("--parallel fsdp does not train in float16 (its gradient scaler would skip steps on "
                            "one rank's share alone); use --dtype bfloat16 or float32")


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor from a sharded one (a collective: every rank calls it, in the same order)."""
    from torch.distributed.tensor import DTensor

    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


def plain(t: torch.Tensor) -> torch.Tensor:
    """A scalar that may be a DTensor (the clipped gradient norm), as an ordinary tensor on every rank."""
    return _full(t)


@dataclass
class Gathered:
    """The run's full state on rank 0 (None elsewhere): what a single process would save."""

    model: GPT | None
    optimizers: list[dict[str, Any]] | None


class Sharded:
    """One model, sharded over the ranks of `group` in place (its class becomes FSDP's, its parameters DTensors)."""

    def __init__(self, model: GPT, group: Group):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.model, self.group = model, group
        self.mesh = init_device_mesh(group.device.type, (group.world_size,), mesh_dim_names=("shard",))
        # every rank built the same weights from the same seed: each keeps its slice, nothing is sent
        for block in model.blocks:
            fully_shard(block, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        self._copy: GPT | None = None  # rank 0's plain model for saving and sampling, made at the first gather

    def micro_step(self, last: bool) -> None:
        """Before one micro-batch: on the inner ones the gradients accumulate whole on each rank and the
        weights stay gathered (no reduce-scatter, no second all-gather); the last one reduce-scatters, averaged."""
        self.model.set_requires_gradient_sync(last)
        self.model.set_reshard_after_backward(last)

    def eval_rounds(self, eval_iters: int) -> int:
        """Every rank must run as many forwards as the others (each gathers weights with them): eval_iters
        rounded up to a multiple of the world size (the extra forwards are thrown away)."""
        world = self.group.world_size
        return -(-eval_iters // world) * world

    # -- saving: the shards gathered into what one process would write -------
    def gather(self, optimizers: list[torch.optim.Optimizer]) -> Gathered:
        """Every rank calls this (collectives); rank 0 gets a plain GPT with the full weights and the optimizers'
        state dicts as a single process's optimizer.state_dict() gives them."""
        main = self.group.is_main
        weights: dict[str, torch.Tensor] = {}
        seen: dict[int, str] = {}
        for name, t in self.model.state_dict(keep_vars=True).items():
            if id(t) in seen:  # the tied head: the same parameter under a second name, gathered once
                if main:
                    weights[name] = weights[seen[id(t)]]
                continue
            seen[id(t)] = name
            full = _full(t)
            if main:
                weights[name] = full.cpu()
        states = [self._gather_optimizer(opt) for opt in optimizers]
        if not main:
            return Gathered(None, None)
        copy = self._plain_copy()
        copy.load_state_dict(weights)
        return Gathered(copy, states)

    def _gather_optimizer(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        sd = opt.state_dict()  # keyed by parameter index, as a single process's: the file format stays one
        state = {k: {n: _full(v).cpu() if torch.is_tensor(v) else v for n, v in sd["state"][k].items()}
                 for k in sorted(sd["state"])}
        return {"state": state, "param_groups": sd["param_groups"]}

    def _plain_copy(self) -> GPT:
        """A plain GPT of the same config on the CPU, kept for the run; built without touching the run's RNG
        (rank 0's is the one last/ saves, and a single process never draws these numbers)."""
        if self._copy is None:
            with torch.random.fork_rng(devices=[]):
                self._copy = GPT(self.model.config)
        return self._copy

    # -- resuming: every rank reads the full files and keeps its slice ------
    def _slice(self, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, distribute_tensor

        full = full.to(device=like.device, dtype=like.dtype)
        if not isinstance(like, DTensor):
            return full
        # src_data_rank=None: every rank has the whole tensor (it read the file), so each cuts its own piece
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)

    def load_weights(self, path: Path) -> None:
        """The full weights of a model.safetensors (any run's) into this rank's shards."""
        from safetensors import SafetensorError, safe_open

        names: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)  # the tied matrix is stored once, under either name
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                stored, used = set(f.keys()), set()
                with torch.no_grad():
                    for name, p in self.model.named_parameters():
                        key = next((n for n in names[id(p)] if n in stored), None)
                        if key is None:
                            raise PocketError(f"weights in {path} do not fit this model (missing {name}); "
                                              "was config.json changed?")
                        full = f.get_tensor(key)
                        if tuple(full.shape) != tuple(p.shape):
                            raise PocketError(f"weights in {path} do not fit this model ({key} is "
                                              f"{tuple(full.shape)}, the model's {tuple(p.shape)})")
                        p.copy_(self._slice(full, p))
                        used.add(key)
        except (SafetensorError, OSError) as e:
            raise PocketError(f"cannot read weights {path}: {str(e).splitlines()[0]}; retrain or resume from "
                              "a good copy") from None
        if stored - used:
            raise PocketError(f"weights in {path} do not fit this model (unexpected {sorted(stored - used)[:3]})")

    def load_optimizer(self, opt: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
        """A single process's optimizer state dict (full tensors) into this rank's shards of it."""
        params = [p for group in opt.param_groups for p in group["params"]]
        state = {}
        for key, values in saved["state"].items():
            p = params[int(key)]
            state[key] = {n: self._slice(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
                          for n, v in values.items()}
        opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
