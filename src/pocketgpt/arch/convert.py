"""A family's rename table applied to tensors, both ways: ours -> theirs (export) and theirs -> ours (import).

to_theirs gives a family's tensors under its names: in its Hugging Face layout (hf=True: transposes
applied), or in nn.Linear's (out, in) layout that GGUF files hold. from_theirs checks a foreign
checkpoint against the table (nothing missing, nothing unexpected, the zeros it stands for our
absent biases really zero) and returns our state dict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..config import ModelConfig
from ..errors import PocketError
from .family import GATE_UP, QKV, TRANSPOSE, Family

if TYPE_CHECKING:
    from ..model import GPT

HEAD = "lm_head.weight"  # our head: the embedding itself when tied, so it has no row in a table


def split_rows(t: torch.Tensor, how: str, cfg: ModelConfig) -> list[torch.Tensor]:
    """Our tensor cut into what the family stores for it (rows), or itself whole."""
    if how == QKV:
        return list(t.split(list(cfg.qkv_sizes), dim=0))
    if how == GATE_UP:
        return list(t.chunk(2, dim=0))
    return [t]


def to_theirs(state: dict[str, torch.Tensor], fam: Family, cfg: ModelConfig, hf: bool = True
              ) -> dict[str, torch.Tensor]:
    """Our float32 tensors as the family's, in our state dict's order, then what we lack (zeros or
    ones, in the table's order). Every tensor is a fresh contiguous copy on the CPU."""
    table = fam.renames(cfg)
    by_ours = {r.ours: r for r in table if r.ours}
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        r = by_ours.get(key)
        if r is None:
            if key == HEAD and cfg.tie_embeddings:
                continue  # tied: the family takes its head from the embedding
            raise ValueError(f"the {fam.name} table has no row for {key}")
        t = t.detach().float().cpu()
        for name, part in zip(r.theirs, split_rows(t, r.how, cfg)):
            out[name] = (part.t() if hf and r.how == TRANSPOSE else part).contiguous().clone()
    for r in table:
        if r.ours is None:
            out[r.theirs[0]] = torch.full((r.width,), r.fill)
    return out


def from_theirs(tensors: dict[str, torch.Tensor], fam: Family, cfg: ModelConfig, where: str,
                keep_bfloat16: bool = False) -> dict[str, torch.Tensor]:
    """A family's checkpoint (its names, keys already through fam.hf_key) as our float32 state dict
    (keep_bfloat16: its bfloat16 matrices stay bfloat16, for a LoRA base: lora.narrow_base); a tensor this
    config lacks must hold the value it stands for. Empties `tensors` as it goes, and owns every tensor it
    returns: a tensor of a memory-mapped safetensors file kept as it is would keep every page of the file
    read so far resident."""
    table = fam.renames(cfg)
    needed = {n for r in table for n in r.theirs}
    extra = sorted(set(tensors) - needed - ({fam.hf_head} if cfg.tie_embeddings else set()))
    missing = sorted(needed - set(tensors))
    if missing or extra:
        raise PocketError(f"the weights in {where} do not fit a {fam.title} of this config.json "
                          f"(missing {missing[:3]}, unexpected {extra[:3]})")
    out: dict[str, torch.Tensor] = {}
    for r in table:
        parts = [tensors.pop(n) for n in r.theirs]
        if r.ours is None:
            if any((p != r.fill).any() for p in parts):
                value = "zero" if r.fill == 0 else f"all {r.fill:g}"
                raise PocketError(f"{where}: {r.theirs[0]} is not {value}, and this config has no such tensor")
            continue
        if r.how == TRANSPOSE:
            out[r.ours] = parts[0].t().float().contiguous()
        else:
            joined = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            keep = keep_bfloat16 and joined.dtype == torch.bfloat16 and joined.dim() == 2
            out[r.ours] = joined.to(joined.dtype if keep else torch.float32, copy=True)
    return out


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], where: str) -> "GPT":
    """Our state dict (converted, or a nanoGPT's) as a GPT of cfg around those very tensors; a tensor
    that does not fit is refused by name."""
    from ..model import GPT

    try:
        return GPT.from_state(cfg, state)
    except ValueError as e:
        raise PocketError(f"the weights in {where} do not fit this config: {e}") from None
