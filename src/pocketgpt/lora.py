"""LoRA: low-rank adapters on a fine-tune's frozen base weights, merged for sampling, exported for peft.

With `lora_rank` R (config.LoraConfig) every targeted nn.Linear of a block becomes a LoRALinear:
the base weight W (out, in) is frozen and two small matrices train, A (R, in) and B (out, R), so the
layer computes x W^T + b + (alpha / R) * x A^T B^T. B starts at zero: step 0 is the base model.
Only A and B have gradients and optimizer state (AdamW, never Muon: optim.py), which is where a
full fine-tune's memory goes (weights + gradients + two Adam moments = 16 bytes per parameter;
here 4 per base parameter plus the adapters).

Why a small layer of our own rather than peft's: the model that trains is pocketgpt's GPT (model.py),
not a transformers model, and a run must stay loadable without peft (the core install lacks it, as
it lacks transformers). The layer is laid out so that its tensors *are* peft's: a LoRALinear at
transformer.h.0.attn.c_attn holds lora_A.weight (R, in) and lora_B.weight (out, R), which is exactly
what peft saves for Hugging Face's GPT-2 under base_model.model.transformer.h.0.attn.c_attn (its
Conv1D stores W as (in, out), hence fan_in_fan_out = true, but the factors keep nn.Linear's layout).
export_peft() renames through the model's family table (arch/): nothing is transposed, and a matrix
a family stores as several (q, k and v) gets one adapter per part; tests/test_lora.py checks the
result with peft itself.

In the run folder (rundir.py):
- last/model.safetensors holds the training model whole (frozen base + adapters): resume is exact
  and needs neither the base's source nor peft;
- model.safetensors (the best weights) is merged, a plain GPT: sample, eval, export --format hf,
  serve and info load it as any run's, at full decode speed (no adapter on the hot path);
- adapter.safetensors is the best adapter alone (a few MB), with peft's tensor names less the
  base_model.model. prefix; config.json's [lora] section says rank, alpha and targets.

An eval never needs the whole merged model in memory (float32: Qwen3-0.6B's 1.76 GB of merged block
matrices and a 0.62 GB widened embedding, over a bfloat16 base of 1.2 GB): the best weights are streamed
to their file a merged matrix at a time (save_merged), and the sample decodes through MergedOnRead,
merging a block only while the decoder is in it, unless a merged copy fits under the memory the
process has already used (sampling_model). Both give exactly what merged_model() would.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn as nn

from .config import LoraConfig, ModelConfig
from .errors import PocketError
from .model import GPT, linear

if TYPE_CHECKING:
    from . import arch
    from .checkpoint import Pending
    from .model import DecodeView, LayerTensors

ADAPTER_PARTS = (".lora_A.", ".lora_B.")
PEFT_PREFIX = "base_model.model."  # what PeftModelForCausalLM puts before the base model's own names
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_FILES = (PEFT_WEIGHTS, PEFT_CONFIG, "README.md")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: x W^T + b + scale * B(A(dropout(x))).

    weight and bias are the wrapped layer's own Parameters (shared, not copied), so the state_dict
    keeps the base's names (…c_attn.weight) beside …c_attn.lora_A.weight and …lora_B.weight.
    The engine's decode reads `.weight` alone: sample from sampling_model(), never from this layer.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        narrow = base.weight.dtype == torch.bfloat16  # a bfloat16 base (set_base_dtype): the adapters train in float32
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32 if narrow else base.weight.dtype)
        # A gets nn.Linear's own (Kaiming-uniform) start and B zeros: peft's default init, so the update starts at 0
        self.lora_A = nn.Linear(base.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, **kw)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scale * B A, a new (out, in) tensor: what one plain nn.Linear needs to compute the same."""
        return self.weight + (self.lora_B.weight @ self.lora_A.weight) * self.scale


def is_adapter(name: str) -> bool:
    """True for a LoRA factor's parameter name (…lora_A.weight, …lora_B.weight)."""
    return any(part in name for part in ADAPTER_PARTS)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def add_adapters(model: GPT, cfg: LoraConfig) -> int:
    """Freeze every weight of model and wrap its targeted block matrices, in place (the base narrowed to
    bfloat16 first where cfg says so); returns the trainable count."""
    model.requires_grad_(False)
    if cfg.lora_base_dtype == "bfloat16":
        set_base_dtype(model, cfg)
    for name, layer in _targets(model, cfg):
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, LoRALinear(layer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout))
    return trainable_params(model)


def _targets(model: GPT, cfg: LoraConfig) -> list[tuple[str, nn.Linear]]:
    suffixes = tuple("." + m for m in cfg.modules)
    in_blocks = {id(m) for m in model.blocks.modules()}
    return [(n, m) for n, m in model.named_modules()
            if id(m) in in_blocks and n.endswith(suffixes) and isinstance(m, nn.Linear)]


def _base_matrices(model: GPT, cfg: LoraConfig) -> list[nn.Parameter]:
    """The frozen matrices a bfloat16 base keeps narrow: the targeted ones (their LoRALinear computes through
    model.linear), the token embedding and the output head (GPT.forward's); never a norm's gains, a bias
    or an untargeted matrix (nn.Linear's own forward would meet a float32 input)."""
    found = [layer.weight for _, layer in _targets(model, cfg)] + [model.token_embedding.weight,
                                                                   model.lm_head.weight]
    return list({id(p): p for p in found}.values())  # a tied head is the embedding: once


def exactly_bfloat16(model: GPT, cfg: LoraConfig) -> bool:
    """Whether every matrix set_base_dtype would narrow holds bfloat16 values only (float32 whose low 16 bits
    are zero: a checkpoint shipped in bfloat16), so that narrowing loses nothing."""
    return all(not (p.detach().float().view(torch.int32) & 0xFFFF).any() for p in _base_matrices(model, cfg))


def set_base_dtype(model: GPT, cfg: LoraConfig) -> None:
    """With lora_base_dtype bfloat16, the base's frozen matrices to bfloat16 and every other tensor to float32;
    otherwise every tensor float32 (a base loaded with its bfloat16 matrices kept: hf.load_hf_folder). In place:
    each Parameter's data is replaced, so every module and model sharing that Parameter sees it, and the old
    storage is freed once nothing else holds it. bfloat16 halves the largest share of a LoRA fine-tune's
    memory; the products still run in the run's dtype (model.linear)."""
    narrow = {id(p) for p in _base_matrices(model, cfg)} if cfg.lora_base_dtype == "bfloat16" else set()
    for p in model.parameters():
        want = torch.bfloat16 if id(p) in narrow else torch.float32
        if p.is_floating_point() and p.dtype != want:
            p.data = p.data.to(want)


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by parameter name (peft's names less its prefix), detached, on the CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if is_adapter(n)}


def merged_model(model: GPT) -> GPT:
    """A plain GPT computing what the LoRA model computes: targeted matrices merged (W + scale B A),
    every other tensor shared with model (no copy). For sampling at full speed (sampling_model); the
    best weights are written from model itself, a tensor at a time (save_merged), the same file.
    model itself (base, adapters, optimizer's view of them) is not touched."""
    state: dict[str, torch.Tensor] = {}
    wide: dict[int, torch.Tensor] = {}
    for k, (v, layer) in _plain_sources(model).items():
        if layer is not None:
            state[k] = layer.merged_weight()
        elif v.dtype == torch.bfloat16:  # the engine decodes float32: widened, each tensor once (a tied head is the embedding)
            if v.data_ptr() not in wide:
                wide[v.data_ptr()] = v.float()
            state[k] = wide[v.data_ptr()]
        else:
            state[k] = v
    plain = gpt_around(model.config, state, dict(model.named_buffers()))
    return plain.requires_grad_(False).train(model.training)


def _plain_sources(model: GPT) -> dict[str, tuple[torch.Tensor, "LoRALinear | None"]]:
    """merged_model()'s state-dict names, each with the model's tensor it comes from and, for a targeted
    matrix, its LoRALinear (whose merged_weight() it is)."""
    targets = {f"{name}.weight": layer for name, layer in lora_layers(model)}
    return {k: (v, targets.get(k)) for k, v in model.state_dict().items() if not is_adapter(k)}


# rows of a bfloat16 tensor widened at a time while saving: 16 MB of float32 for a 1024-wide embedding
WIDEN_ROWS = 4096


def merged_pending(model: GPT) -> tuple[dict[str, "Pending"], dict[str, str]]:
    """merged_model()'s tensors as checkpoint.Pending, made only when written, and safetensors' save_model
    metadata for the tied names it drops (dropped -> kept: the first name in sorted order, as it keeps).
    A merged matrix is made whole (one at a time); a widened bfloat16 one WIDEN_ROWS rows at a time."""
    from .checkpoint import Pending

    pending: dict[str, Pending] = {}
    kept: dict[int, str] = {}
    ties: dict[str, str] = {}
    sources = _plain_sources(model)
    for k in sorted(sources):
        v, layer = sources[k]
        if v.numel() and v.data_ptr() in kept:
            ties[k] = kept[v.data_ptr()]
            continue
        kept[v.data_ptr()] = k
        shape = tuple(v.shape)
        if layer is not None:
            dtype = torch.promote_types(v.dtype, layer.lora_A.weight.dtype)  # what merged_weight() gives
            pending[k] = Pending(dtype, shape, lambda layer=layer: [layer.merged_weight()])
        elif v.dtype == torch.bfloat16:
            pending[k] = Pending(torch.float32, shape, lambda v=v: (v[i:i + WIDEN_ROWS].float()
                                                                    for i in range(0, len(v), WIDEN_ROWS)))
        else:
            pending[k] = Pending(v.dtype, shape, lambda v=v: [v.detach().contiguous()])
    return pending, ties


def save_merged(model: GPT, path: Path, metadata: dict[str, str]) -> None:
    """The merged best weights (what save_weights(merged_model(model)) writes, byte for byte) streamed: one
    merged matrix or a slice of a widened one held at a time, never the whole merged model."""
    from .checkpoint import save_streamed

    pending, ties = merged_pending(model)
    save_streamed(pending, path, {**ties, **metadata})  # save_model adds a tie's note unless metadata names it


def merged_bytes(model: GPT) -> int:
    """What merged_model(model) holds beyond model's own tensors: its merged and widened ones (float32)."""
    pending, _ = merged_pending(model)
    sources = _plain_sources(model)
    new = [p for k, p in pending.items() if sources[k][1] is not None or sources[k][0].dtype == torch.bfloat16]
    return sum(torch.Size(p.shape).numel() * torch.empty((), dtype=p.dtype).element_size() for p in new)


def sampling_model(model: GPT) -> "GPT | MergedOnRead":
    """What the eval's sample decodes: merged_model(model) when holding it keeps this process under the
    peak it has reached already (the training's steps took that much), else MergedOnRead(model), which
    gives the same ids holding one block's merged matrices at a time, merging every block again at each
    forward. Where the process's memory cannot be read (not Linux), merged_model."""
    from .runtime import process_memory_mb

    memory = process_memory_mb()
    if memory is None or memory[0] + merged_bytes(model) / 2**20 <= memory[1]:
        return merged_model(model)
    return MergedOnRead(model)


class MergedOnRead:
    """A LoRA model as the engine's float32 decoder reads merged_model()'s: the same tensors by role
    (decode_view), each block's targeted matrices merged (W + scale B A, merged_weight(): the values
    merged_model() holds) only when the decoder reaches that block and dropped after it, a bfloat16
    embedding and head widened once. So a sample holds one block's merged matrices, not all of them
    (Qwen3-0.6B: 63 MB, not 1.76 GB), and costs a merge of every block per forward (each decode step).
    Only what the engine uses of a GPT is here; forward() is not (the training model's is the LoRA one)."""

    def __init__(self, model: GPT):
        self.model, self.config = model, model.config
        # each block's LoRA layers by their base weight's storage: how a decode view's matrix is recognised
        self._targets = [{layer.weight.data_ptr(): layer for _, layer in lora_layers(block)} for block in model.blocks]

    def eval(self) -> "MergedOnRead":  # the decoder calls no module: the training model's mode is left alone
        return self

    def train(self, mode: bool = True) -> "MergedOnRead":
        return self

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def num_params(self, non_embedding: bool = False) -> int:
        return self.model.num_params(non_embedding) - trainable_params(self.model)

    def decode_view(self) -> "DecodeView":
        from dataclasses import replace

        from .model import LayersOnRead

        view = self.model.decode_view()
        wte = _widened(view.wte)
        head = wte if view.head.data_ptr() == view.wte.data_ptr() else _widened(view.head)
        layers = LayersOnRead(len(view.layers), lambda i: self._merged_layer(i, view.layers[i]))
        return replace(view, wte=wte, head=head, layers=layers, norm_f=_widened(view.norm_f),
                       wpe=_widened(view.wpe))

    def _merged_layer(self, i: int, layer: "LayerTensors") -> "LayerTensors":
        from dataclasses import fields, replace

        targets = self._targets[i]

        def plain(t: object) -> object:
            if isinstance(t, torch.Tensor) and t.data_ptr() in targets:
                return targets[t.data_ptr()].merged_weight()
            return _widened(t)

        return replace(layer, **{f.name: plain(getattr(layer, f.name)) for f in fields(layer)})


def _widened(t: object) -> object:
    """A bfloat16 tensor as float32 (or each of a tuple's), as merged_model() holds it; anything else as it is."""
    if isinstance(t, tuple):
        return tuple(_widened(x) for x in t)
    return t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 else t


def gpt_around(cfg: ModelConfig, state: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> GPT:
    """A GPT of cfg that holds the given tensors themselves: no copy, no init work (merged_model, and
    trainer.build_model when it crops a base's context). Derived buffers (rotary tables, in no state
    dict) come from `buffers`, cut to cfg's shape (a shorter context keeps their first rows)."""
    with torch.device("meta"):  # the module tree alone; the tensors come next
        gpt = GPT(cfg)
    gpt.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:  # assign made two Parameters of the shared matrix; one again, as GPT ties it
        gpt.lm_head.weight = gpt.token_embedding.weight
    for name, empty in list(gpt.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        setattr(gpt.get_submodule(owner), leaf, buffers[name][tuple(slice(0, n) for n in empty.shape)])
    return gpt


def load_merged(cfg: ModelConfig, lora: LoraConfig, path: Path) -> GPT:
    """A LoRA training checkpoint (base + adapters, e.g. last/model.safetensors) as a merged plain GPT."""
    from .checkpoint import load_weights

    model = GPT(cfg)
    add_adapters(model, lora)
    load_weights(model, path)
    return merged_model(model)


# ---------------------------------------------------------------- the adapter on its own

def save_adapter(model: nn.Module, path: Path, lora: LoraConfig, metadata: dict[str, str]) -> None:
    """The adapters alone as safetensors, their LoRA settings in the metadata (so the file describes itself)."""
    from .checkpoint import save_tensors

    meta = {**metadata, "lora_rank": str(lora.lora_rank), "lora_alpha": str(lora.lora_alpha),
            "lora_targets": ",".join(lora.modules)}
    save_tensors(adapter_tensors(model), path, meta)


def read_adapter(run_dir: Path, checkpoint: str = "best") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a run's best adapter (adapter.safetensors) or last one (from last/)."""
    from safetensors import SafetensorError, safe_open

    from .checkpoint import WEIGHTS, resume_dir
    from .rundir import ADAPTER

    if checkpoint not in ("best", "last"):
        raise PocketError(f"--checkpoint must be 'best' or 'last', got '{checkpoint}'")
    if checkpoint == "best":
        path = run_dir / ADAPTER
        if not path.is_file():
            raise PocketError(f"{run_dir} has no {ADAPTER} yet (no eval finished); try --checkpoint last")
    else:
        last = resume_dir(run_dir)
        if last is None:
            raise PocketError(f"{run_dir} has no last/ checkpoint; try --checkpoint best")
        path = last / WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if is_adapter(k)}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise PocketError(f"cannot read the adapter in {path}: {str(e).splitlines()[0]}") from None


# ---------------------------------------------------------------- export for peft

def peft_adapter(tensors: dict[str, torch.Tensor], fam: "arch.Family", cfg: ModelConfig
                 ) -> tuple[dict[str, torch.Tensor], list[str], bool]:
    """Our adapter tensors as peft's on the family's model: (tensors under their module names,
    target_modules, fan_in_fan_out). A matrix they store as several (our fused q/k/v, gate/up) gets
    an adapter per part: the same A, B's rows split, which adds exactly what ours adds."""
    from .arch.family import TRANSPOSE
    from .arch.convert import split_rows

    renames = {r.ours: r for r in fam.renames(cfg) if r.ours}
    out: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    transposed = False
    block0 = fam.lora_block.format(i=0)
    for a_name in [k for k in tensors if k.endswith(".lora_A.weight")]:
        module = a_name.removesuffix(".lora_A.weight")
        r = renames[module + ".weight"]
        a, b = tensors[a_name], tensors[module + ".lora_B.weight"]
        for theirs, b_part in zip(r.theirs, split_rows(b, r.how, cfg)):
            their_module = theirs.removesuffix(".weight")
            out[PEFT_PREFIX + their_module + ".lora_A.weight"] = a.clone()  # safetensors refuses shared storage
            out[PEFT_PREFIX + their_module + ".lora_B.weight"] = b_part.contiguous()
            if their_module.startswith(block0) and their_module.removeprefix(block0) not in targets:
                targets.append(their_module.removeprefix(block0))
        transposed = transposed or r.how == TRANSPOSE
    return out, targets, transposed


def peft_config(lora: LoraConfig, base: str, targets: list[str], fan_in_fan_out: bool) -> dict[str, object]:
    """adapter_config.json as peft reads it (fan_in_fan_out: the family stores W as (in, out), GPT-2's Conv1D)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": lora.lora_rank, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
        "target_modules": targets, "fan_in_fan_out": fan_in_fan_out, "bias": "none",
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def _base_notes(record: dict[str, str] | None) -> tuple[str, list[str]]:
    """What adapter_config.json names as the base, and what the user should know about it."""
    if not record:
        return "", ["the run does not say what it was fine-tuned from; set base_model_name_or_path in "
                    f"{PEFT_CONFIG} to the base's Hugging Face folder or hub name"]
    source, kind = record["source"], record.get("kind", "")
    if kind == "hub":
        return source, []
    if kind == "huggingface":
        return str(Path(source).resolve()), []
    return source, [f"the base {source} is a {kind} model, not a Hugging Face one: write it as one with "
                    f"`pocketgpt export --model {source} --format hf --out BASE_DIR`, load the adapter onto "
                    f"BASE_DIR, and set base_model_name_or_path in {PEFT_CONFIG} to it"]


def _card(run_dir: Path, base: str, lora: LoraConfig, params: int, family_title: str) -> str:
    shown = base or "BASE_DIR"
    return "\n".join([
        "---", "library_name: peft", *([f"base_model: {base}"] if base else []), "tags:", "- pocketgpt", "- lora",
        "---", "",
        f"# LoRA adapter from {run_dir.resolve().name}", "",
        f"Rank {lora.lora_rank}, alpha {lora.lora_alpha:g}, on {', '.join(lora.modules)} of every block: "
        f"{params:,} parameters, trained with [pocketgpt](https://pypi.org/project/pocketgpt/).", "",
        "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
        f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{shown}"), "PATH")',
        f"model = model.merge_and_unload()  # optional: one plain {family_title}, full speed", "```", ""])


def export_peft(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False, checkpoint: str = "best") -> list[str]:
    """Write a LoRA run's adapter as a folder Hugging Face peft loads onto the base model's HF folder:
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), out_dir). Returns notes for the user."""
    from . import rundir
    from .checkpoint import read_weights_metadata, save_tensors
    from .files import atomic_write_text, export_dir, write_json
    from .hf import exporting_family

    run = rundir.check_is_run(run_dir)
    cfg, raw = rundir.read_config(run)
    if not cfg.lora.enabled:
        raise PocketError(f"{run} was not trained with LoRA (lora_rank 0), so it has no adapter to export; "
                          "export the whole model with --format hf")
    fam = exporting_family(cfg.model)  # peft loads onto a Hugging Face model: the base must be one
    tensors, meta = read_adapter(run, checkpoint)
    base, notes = _base_notes(raw.get("init_from"))
    if checkpoint == "best" and (run / rundir.BEST_WEIGHTS).is_file():
        best_iter = read_weights_metadata(run / rundir.BEST_WEIGHTS).get("iter")
        if meta.get("iter") != best_iter:  # a kill between the two writes of one eval
            notes.append(f"{rundir.ADAPTER} is from iter {meta.get('iter')} but {rundir.BEST_WEIGHTS} from iter "
                         f"{best_iter}; the adapter is exported")
    out = export_dir(Path(out_dir), overwrite, PEFT_FILES)
    theirs, targets, fan_in_fan_out = peft_adapter(tensors, fam, cfg.model)
    save_tensors(theirs, out / PEFT_WEIGHTS, {"format": "pt"})
    write_json(out / PEFT_CONFIG, peft_config(cfg.lora, base, targets, fan_in_fan_out))
    params = sum(t.numel() for t in tensors.values())
    atomic_write_text(out / "README.md", _card(run, base, cfg.lora, params, fam.title))
    return notes


def describe(lora: LoraConfig, model: ModelConfig, base_params: int) -> str:
    """'LoRA rank 8 (alpha 16) on attn.c_attn, …: 1,179,648 trainable parameters (0.95% of the base's 124,439,808, …)'."""
    n = lora.trainable_params(model)
    return (f"LoRA rank {lora.lora_rank} (alpha {lora.lora_alpha:g}) on {', '.join(lora.modules)}: {n:,} trainable "
            f"parameters ({100 * n / max(base_params, 1):.2f}% of the base's {base_params:,}, which stay frozen)")
