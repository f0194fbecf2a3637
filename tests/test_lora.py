"""LoRA (lora.py): only adapters train, AdamW not Muon, a small adapter file, merged sampling, exact resume,
export for peft with equal logits, and the refusals."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch

from helpers import TINY, metrics, run_cli, tiny_config  # noqa: E402

from pocketgpt import launch as launching  # noqa: E402
from pocketgpt import lora, rundir  # noqa: E402
from pocketgpt.checkpoint import load_weights, read_weights_metadata  # noqa: E402
from pocketgpt.config import LoraConfig, ModelConfig, OptimConfig, build_train_config, check_lora  # noqa: E402
from pocketgpt.errors import PocketError  # noqa: E402
from pocketgpt.loading import load  # noqa: E402
from pocketgpt.metrics import MetricsLog  # noqa: E402
from pocketgpt.model import GPT  # noqa: E402
from pocketgpt.optim import Muon, make_optimizers  # noqa: E402
from pocketgpt.runtime import resolve  # noqa: E402
from pocketgpt.trainer import Trainer, train  # noqa: E402

QUIET = dict(echo=lambda s: None)
LORA = dict(lora_rank=4, lora_alpha=8)
# a fine-tune's run keys: helpers.TINY without its shape (the base's), a high rate so B moves off zero fast
RUN = {k: v for k, v in TINY.items() if k not in ("n_layer", "n_head", "n_embd", "block_size", "dropout")}
FAST = {**RUN, **LORA, "learning_rate": 1e-2, "min_lr": 1e-3, "warmup_iters": 0, "block_size": 32, "batch_size": 4}


@pytest.fixture(scope="module")
def char_base(tmp_path_factory, data_dir) -> GPT:
    """A tiny trained char model to adapt (fast: its vocabulary is the corpus's few characters)."""
    out = tmp_path_factory.mktemp("base") / "base"
    train(tiny_config(max_iters=10), data_dir, out, **QUIET)
    return load(out).model


def fresh(base: GPT) -> GPT:
    copy = GPT(base.config)
    copy.load_state_dict(base.state_dict())
    return copy


def lora_cfg(**overrides):
    return tiny_config(**{**LORA, **overrides})


def trainer_on(base: GPT, data_dir: Path, tmp_path: Path, **overrides) -> Trainer:
    runtime = resolve("cpu", "float32")
    return Trainer.create(lora_cfg(**overrides), data_dir, tmp_path, runtime,
                          MetricsLog(tmp_path / "m.jsonl", **QUIET), initial=fresh(base))


def test_only_the_adapters_train_and_the_base_stays_bit_identical(char_base, data_dir, tmp_path):
    t = trainer_on(char_base, data_dir, tmp_path, learning_rate=1e-2, warmup_iters=0)
    before = {k: v.clone() for k, v in char_base.state_dict().items()}
    for it in range(3):
        t.step(it, 1e-2)
    state = t.model.state_dict()
    adapters = {k for k in state if lora.is_adapter(k)}
    assert adapters == {f"transformer.h.{i}.{m}.lora_{f}.weight" for i in range(TINY["n_layer"])
                        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj") for f in "AB"}
    assert all(torch.equal(state[k], v) for k, v in before.items())  # every base tensor, bit for bit
    assert all(bool(state[k].abs().sum() > 0) for k in adapters if ".lora_B." in k)  # B has left zero
    trained = {id(p) for opt in t.optimizers for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for n, p in t.model.named_parameters() if lora.is_adapter(n)}
    assert all(not p.requires_grad for n, p in t.model.named_parameters() if not lora.is_adapter(n))
    assert lora.trainable_params(t.model) == t.cfg.lora.trainable_params(t.cfg.model)  # the config's arithmetic
    assert len(t.optimizers[0].state) == len(adapters)  # optimizer state for the adapters alone


def test_muon_never_gets_an_adapter_matrix(char_base):
    model = fresh(char_base)
    lora.add_adapters(model, LoraConfig(lora_rank=4))
    opts = make_optimizers(model, OptimConfig(optimizer="muon"), torch.device("cpu"))
    assert [type(o) for o in opts] == [torch.optim.AdamW]  # nothing else trains: no Muon at all
    model.transformer.h[0].attn.c_attn.weight.requires_grad_(True)  # a block matrix that does train
    opts = make_optimizers(model, OptimConfig(optimizer="muon"), torch.device("cpu"))
    muon = [p for o in opts if isinstance(o, Muon) for g in o.param_groups for p in g["params"]]
    assert [id(p) for p in muon] == [id(model.transformer.h[0].attn.c_attn.weight)]
    with pytest.raises(PocketError, match="optimizer muon: with LoRA only the adapters train.*AdamW"):
        check_lora(build_train_config(None, None, {**LORA, "optimizer": "muon"}), has_base=True)


def test_the_merged_model_computes_what_the_adapters_do(char_base):
    torch.manual_seed(0)  # the same adapters and ids whichever tests ran before
    model = fresh(char_base)
    lora.add_adapters(model, LoraConfig(lora_rank=4, lora_targets="attn,mlp"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if lora.is_adapter(name):
                p.normal_(0.0, 0.3)
    merged = lora.merged_model(model.eval())
    assert not any(lora.is_adapter(k) for k in merged.state_dict())
    assert merged.lm_head.weight is merged.transformer.wte.weight  # still tied
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        want, got, before = model(idx)[0], merged(idx)[0], char_base.eval()(idx)[0]
    # adapters this large (scale 4, entries ~0.3) make the merged and the two-path sums round apart by ~1e-5
    assert float((want - got).abs().max()) < 1e-4
    assert float((want - before).abs().max()) > 1e-2  # the adapters do change the logits


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> Path:
    from test_finetune import tiny_gpt2  # skips the tests that need it when transformers is missing

    return tiny_gpt2(tmp_path_factory.mktemp("hf") / "tiny-gpt2")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, gpt2_folder, corpus_text) -> Path:
    """A LoRA fine-tune of the tiny Hugging Face GPT-2 (the CLI's path: launch, finetune-lora preset)."""
    root = tmp_path_factory.mktemp("lora")
    book = root / "book.txt"
    book.write_text(corpus_text[:8000], encoding="utf-8")
    out = root / "run"
    launching.launch(launching.TrainRequest(inputs=[str(book)], out=str(out), init_from=str(gpt2_folder),
                                            overrides={**FAST, "max_iters": 4, "eval_interval": 2}), **QUIET)
    return out


def test_a_lora_run_folder(lora_run, gpt2_folder):
    cfg, raw = rundir.read_config(lora_run)
    assert cfg.lora.lora_rank == 4 and raw["lora"]["lora_alpha"] == 8 and raw["init_from"]["kind"] == "huggingface"
    assert cfg.optim.weight_decay == 0.01 and cfg.run.early_stop_patience == 4  # the finetune-lora preset's
    written = {p.name for p in lora_run.iterdir()}
    assert rundir.ADAPTER in written and written <= set(rundir.RUN_FILES) | {rundir.LOCK, rundir.DATA}
    adapter, best = lora_run / rundir.ADAPTER, lora_run / rundir.BEST_WEIGHTS
    assert adapter.stat().st_size * 50 < best.stat().st_size  # the adapter alone is small
    assert read_weights_metadata(adapter)["iter"] == read_weights_metadata(best)["iter"]
    tensors, _ = lora.read_adapter(lora_run)
    assert sum(t.numel() for t in tensors.values()) == rundir.summary(lora_run)["lora"]["trainable_parameters"]
    assert set(lora.read_adapter(lora_run, "last")[0]) == set(tensors)
    base = load(gpt2_folder).model.state_dict()  # last/ keeps the base whole and untouched (its context cropped)
    model = GPT(cfg.model)
    lora.add_adapters(model, cfg.lora)
    load_weights(model, lora_run / "last" / "model.safetensors")
    assert all(torch.equal(v, base[k][: len(v)]) for k, v in model.state_dict().items() if not lora.is_adapter(k))
    model.load_state_dict(tensors, strict=False)  # the best adapter on the base: the best weights, merged
    merged = lora.merged_model(model)
    assert all(torch.equal(v, load(lora_run).model.state_dict()[k]) for k, v in merged.state_dict().items())
    report = (lora_run / rundir.REPORT).read_text()
    assert "**LoRA:** rank 4, alpha 8, on attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj" in report
    assert "| lora | `lora_rank` | 4 |" in report


def test_sampling_a_lora_run_uses_the_merged_weights(lora_run):
    cfg, _ = rundir.read_config(lora_run)
    unmerged = GPT(cfg.model)
    lora.add_adapters(unmerged, cfg.lora)
    load_weights(unmerged, lora_run / "last" / "model.safetensors")
    unmerged.eval()
    lm = load(lora_run, checkpoint="last")
    assert not any(lora.is_adapter(k) for k in lm.model.state_dict())  # a plain GPT: the engine's fast decode
    ids = lm.tokenizer.encode("ROMEO: what light")
    with torch.no_grad():
        want = unmerged(torch.tensor([ids]))[0][0]
    assert float((lm.logits(ids) - want).abs().max()) < 1e-4
    greedy = lm.generate("ROMEO:", max_new_tokens=8, temperature=0)  # engine decode, KV cache
    ids = lm.tokenizer.encode("ROMEO:")
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(unmerged(torch.tensor([ids]))[0][0, -1].argmax()))
    assert greedy == lm.tokenizer.decode(ids)


def test_export_peft_loads_onto_the_base_with_equal_logits(lora_run, gpt2_folder, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "adapter"
    assert lora.export_peft(lora_run, out) == []
    assert json.loads((out / lora.PEFT_CONFIG).read_text())["base_model_name_or_path"] == str(gpt2_folder.resolve())
    base = transformers.GPT2LMHeadModel.from_pretrained(str(gpt2_folder), attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    lm = load(lora_run)
    ids = lm.tokenizer.encode("ROMEO: but soft, what light through yonder window")
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0]
    assert float((theirs - lm.logits(ids)).abs().max()) < 1e-4
    assert float((theirs - load(gpt2_folder).logits(ids)).abs().max()) > 1e-3  # the adapter is applied
    with pytest.raises(PocketError, match="exists and is not empty; add --overwrite"):
        lora.export_peft(lora_run, out)
    assert lora.export_peft(lora_run, out, overwrite=True, checkpoint="last") == []


def test_a_lora_run_works_with_the_commands_that_load_runs(lora_run, tmp_path, capsys):
    code, text, _ = run_cli(capsys, "info", "--model", lora_run, "--json")
    assert code == 0 and json.loads(text)["lora"]["rank"] == 4
    for argv in (["sample", "--model", lora_run, "--max-new-tokens", "5", "--checkpoint", "last"],
                 ["eval", "--model", lora_run], ["export", "--model", lora_run, "--out", tmp_path / "hf"],
                 ["export", "--model", lora_run, "--format", "peft", "--out", tmp_path / "peft"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 0, (argv, err)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in (tmp_path / "peft").iterdir()}
    code, text, _ = run_cli(capsys, "info", "--model", lora_run)
    assert code == 0 and "LoRA rank 4" in text and "trainable parameters" in text


def test_export_peft_of_a_run_without_lora_is_one_line(tmp_path, capsys, data_dir):
    from helpers import train_tiny

    run = train_tiny(tmp_path / "full", data_dir, max_iters=2)
    code, _, err = run_cli(capsys, "export", "--model", run, "--format", "peft", "--out", tmp_path / "peft")
    assert code == 2 and "not trained with LoRA" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "peft").exists()


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_of_a_lora_run_continues_exactly(char_base, data_dir, tmp_path, dropout):
    kw = dict(lr_decay_iters=12, eval_interval=4, learning_rate=1e-2, warmup_iters=2, dropout=0.1,
              lora_dropout=dropout)  # dropouts: the RNG state must resume too
    train(lora_cfg(max_iters=12, **kw), data_dir, tmp_path / "straight", initial_model=fresh(char_base), **QUIET)
    train(lora_cfg(max_iters=8, **kw), data_dir, tmp_path / "resumed", initial_model=fresh(char_base), **QUIET)
    train(lora_cfg(max_iters=12, **kw), data_dir, tmp_path / "resumed", resume=True, **QUIET)
    key = lambda run, k: {m["iter"]: m[k] for m in metrics(run) if k in m}  # noqa: E731
    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert list(key(a, "loss")) == list(key(b, "loss")) == list(range(1, 13))
    assert key(a, "loss") == pytest.approx(key(b, "loss"), abs=1e-6)
    assert key(a, "val_loss") == pytest.approx(key(b, "val_loss"), abs=1e-6)
    assert lora.read_adapter(a)[0].keys() == lora.read_adapter(b)[0].keys()
    assert all(torch.equal(x, lora.read_adapter(b)[0][k]) for k, x in lora.read_adapter(a)[0].items())


def test_refusals(char_base, data_dir, tmp_path, capsys):
    with pytest.raises(PocketError, match="add --init-from MODEL.*or drop --lora-rank"):
        launching.launch(launching.TrainRequest(data=str(data_dir), out=str(tmp_path / "a"), overrides=LORA))
    with pytest.raises(PocketError, match="add --init-from MODEL"):
        launching.launch(launching.TrainRequest(data=str(data_dir), out=str(tmp_path / "a"), preset="finetune-lora"))
    with pytest.raises(PocketError, match="nothing to adapt"):
        train(lora_cfg(), data_dir, tmp_path / "b", **QUIET)
    assert not rundir.is_run_dir(tmp_path / "a") and not rundir.is_run_dir(tmp_path / "b")
    code, _, err = run_cli(capsys, "train", "--data", data_dir, "--out", tmp_path / "c", "--lora-rank", "8")
    assert code == 2 and "--init-from" in err and len(err.strip().splitlines()) == 1
    for overrides, match in [({"lora_rank": -1}, "lora_rank must be zero \\(off\\) or positive"),
                             ({"lora_targets": "attn,mpl"}, "unknown target 'mpl' \\(did you mean 'mlp'\\?\\)"),
                             ({"lora_rank": 32}, "not below the model's width \\(n_embd 32\\)"),
                             ({"lora_alpha": 0}, "lora_alpha must be positive"),
                             ({"lora_dropout": 1}, "lora_dropout must be in"),
                             ({"lora_base_dtype": "bf16"}, "lora_base_dtype must be one of .*did you mean 'bfloat16'")]:
        with pytest.raises(PocketError, match=match):
            build_train_config(None, None, {**TINY, **LORA, **overrides})
    run = tmp_path / "run"
    train(lora_cfg(max_iters=2, eval_interval=2), data_dir, run, initial_model=fresh(char_base), **QUIET)
    for changed, match in [({"lora_rank": 8}, "lora_rank was 4, now 8"), ({"lora_alpha": 2}, "lora_alpha was 8"),
                           ({"lora_targets": "attn"}, "lora_targets was attn.c_attn,attn.c_proj")]:
        with pytest.raises(PocketError, match=f"--resume cannot change LoRA: {match}"):
            train(lora_cfg(max_iters=4, **changed), data_dir, run, resume=True, **QUIET)
    train(lora_cfg(max_iters=3, lora_targets="all"), data_dir, run, resume=True, **QUIET)  # the same modules
    plain = tmp_path / "plain"
    train(tiny_config(max_iters=2, eval_interval=2), data_dir, plain, **QUIET)
    with pytest.raises(PocketError, match="not trained with LoRA.*--format hf"):
        lora.export_peft(plain, tmp_path / "adapter")
    with pytest.raises(PocketError, match="--resume cannot change LoRA: lora_rank was 0, now 4"):
        train(lora_cfg(max_iters=4), data_dir, plain, resume=True, **QUIET)


def test_lora_memory_estimate_counts_the_frozen_base_once(char_base):
    from pocketgpt.plan import memory_estimate_mb

    value_bytes = resolve("cpu", "float32").dtype.itemsize
    cfg = lora_cfg()
    cfg.model.vocab_size = 65
    full, _ = memory_estimate_mb(tiny_config(), 1_000_000, value_bytes)
    part, _ = memory_estimate_mb(cfg, 1_000_000, value_bytes)
    assert full == pytest.approx(16e6 / 2**20)
    assert part == pytest.approx((4e6 + 16 * cfg.lora.trainable_params(cfg.model)) / 2**20)
    assert math.isclose(cfg.lora.trainable_params(cfg.model), 2 * 4 * 32 * (4 + 2 + 5 + 5))


@pytest.mark.parametrize("lora_on", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_gradient_checkpointing_computes_the_same_steps(char_base, data_dir, tmp_path, lora_on):
    kw = dict(max_iters=6, eval_interval=3, dropout=0.1, lora_rank=4 if lora_on else 0)
    for name, on in (("plain", False), ("checkpointed", True)):
        train(tiny_config(**kw, gradient_checkpointing=on), data_dir, tmp_path / name,
              initial_model=fresh(char_base), **QUIET)
    key = lambda run: [m["loss"] for m in metrics(run) if "loss" in m]  # noqa: E731
    assert key(tmp_path / "plain") == pytest.approx(key(tmp_path / "checkpointed"), abs=1e-6)
    t = trainer_on(char_base, data_dir, tmp_path, gradient_checkpointing=True)
    assert all(isinstance(b.forward, functools.partial) for b in t.model.transformer.h)  # it was on


def test_llama_and_qwen_target_names_pick_our_matrices_and_a_lone_part_is_refused():
    from pocketgpt.config import lora_modules

    assert lora_modules("q_proj,k_proj,v_proj,o_proj") == ("attn.c_attn", "attn.c_proj")
    assert lora_modules("gate_proj,up_proj,down_proj") == ("mlp.c_fc", "mlp.c_proj")
    assert lora_modules("q_proj,v_proj,attn") == ("attn.c_attn",)  # the whole matrix named another way
    with pytest.raises(PocketError, match=r"q_proj, k_proj, v_proj are one matrix in pocketgpt \(attn.c_attn\).*"
                                          r"name q_proj and k_proj and v_proj together"):
        lora_modules("q_proj,v_proj")
    with pytest.raises(PocketError, match="gate_proj, up_proj are one matrix"):
        lora_modules("gate_proj,down_proj")


# ---------------------------------------------------------------- the eval's merged weights, without a merged copy

def adapted(base_dtype: str, tied: bool, qwen: bool = False) -> GPT:
    """A small random model with random adapters (B off zero), its base narrowed to bfloat16 or kept float32;
    qwen: rotary positions, RMSNorm, SwiGLU, grouped queries and QK-norm gains, the Qwen3 layout."""
    torch.manual_seed(3)
    family = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, qk_norm=True, qk_norm_gains=True,
                  bias=False) if qwen else {}
    model = GPT(ModelConfig(vocab_size=37, block_size=24, n_layer=2, n_head=2, n_embd=16,
                            tie_embeddings=tied, **family))
    lora.add_adapters(model, LoraConfig(lora_rank=2, lora_alpha=4, lora_base_dtype=base_dtype,
                                        lora_targets="attn,mlp"))  # c_proj of attention stays a plain matrix
    with torch.no_grad():
        for name, p in model.named_parameters():
            if lora.is_adapter(name):
                p.normal_(0.0, 0.3)
    return model


def safetensors_parts(path: Path) -> tuple[dict, bytes, int]:
    """A safetensors file as (its header, parsed; the data bytes; the header's length): safetensors writes the
    metadata in a hash map's order, which may differ between processes; every other byte is fixed."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:], n


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("base_dtype", ["bfloat16", "float32"])
def test_the_streamed_best_weights_are_the_merged_models_file_byte_for_byte(tmp_path, base_dtype, tied):
    from safetensors.torch import load_file

    from pocketgpt.checkpoint import save_weights

    model = adapted(base_dtype, tied)
    assert (model.transformer.wte.weight.dtype == torch.bfloat16) == (base_dtype == "bfloat16")
    meta = {"iter": "4", "val_loss": "1.234567", "format_version": "1"}
    save_weights(lora.merged_model(model), tmp_path / "whole.safetensors", metadata=dict(meta))
    lora.save_merged(model, tmp_path / "streamed.safetensors", meta)
    assert safetensors_parts(tmp_path / "streamed.safetensors") == safetensors_parts(tmp_path / "whole.safetensors")
    got, want = load_file(tmp_path / "streamed.safetensors"), lora.merged_model(model).state_dict()
    assert set(got) | {"transformer.wte.weight"} == set(want) | {"transformer.wte.weight"}  # tied: stored once
    assert all(t.dtype == torch.float32 and torch.equal(t, want[k]) for k, t in got.items())  # float32, as before
    assert read_weights_metadata(tmp_path / "streamed.safetensors").items() >= meta.items()
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temp file, renamed


def test_a_streamed_tensor_is_made_in_parts_only_when_written(tmp_path, monkeypatch):
    from pocketgpt.checkpoint import save_weights

    monkeypatch.setattr(lora, "WIDEN_ROWS", 5)  # the 37-row bfloat16 embedding widened 5 rows at a time
    model = adapted("bfloat16", tied=True)
    pending, ties = lora.merged_pending(model)
    assert ties == {"transformer.wte.weight": "lm_head.weight"}  # the name safetensors' save_model keeps
    parts = list(pending["lm_head.weight"].parts())
    assert [len(p) for p in parts] == [5] * 7 + [2]
    assert torch.equal(torch.cat(parts), model.lm_head.weight.float())
    lora.save_merged(model, tmp_path / "a.safetensors", {})
    whole = tmp_path / "b.safetensors"
    save_weights(lora.merged_model(model), whole, metadata={})
    assert safetensors_parts(tmp_path / "a.safetensors") == safetensors_parts(whole)


@pytest.mark.parametrize("qwen", [False, True])
@pytest.mark.parametrize("base_dtype", ["bfloat16", "float32"])
def test_merged_on_read_samples_the_merged_models_ids(base_dtype, qwen):
    from pocketgpt.engine import Engine
    from pocketgpt.sampling import SamplingSettings

    model = adapted(base_dtype, tied=not qwen, qwen=qwen)
    merged, on_read = lora.merged_model(model), lora.MergedOnRead(model)
    assert on_read.num_params() == merged.num_params()
    settings = SamplingSettings(max_new_tokens=20, seed=5)
    ids = [Engine(m, decode_dtype="float32").generate([1, 2, 3], settings)[0] for m in (merged, on_read)]
    assert ids[0] == ids[1] and len(ids[0]) == 20
    idx, logits = torch.tensor([[4, 5, 6, 7]]), []
    with torch.inference_mode():
        for m in (merged, on_read):
            dec = Engine(m, decode_dtype="float32").decoder()
            logits.append(dec.prefill(idx, dec.new_cache(1, torch.device("cpu"), 4), all_logits=True))
    assert torch.equal(logits[0], logits[1])  # bit for bit: the very merged matrices, one block at a time
    assert model.transformer.h[0].attn.c_attn.weight.dtype == (torch.bfloat16 if base_dtype == "bfloat16" else torch.float32)


def test_sampling_model_merges_whole_only_below_the_peak_already_reached(monkeypatch):
    from pocketgpt import runtime

    model = adapted("bfloat16", tied=True)
    need = lora.merged_bytes(model) / 2**20
    own = {t.data_ptr() for t in model.state_dict().values()}
    made = {t.data_ptr(): t.nbytes for t in lora.merged_model(model).state_dict().values() if t.data_ptr() not in own}
    assert need * 2**20 == sum(made.values())  # the merged matrices and the widened embedding (tied: once)
    monkeypatch.setattr(runtime, "process_memory_mb", lambda: (100.0, 100.0 + need))
    assert isinstance(lora.sampling_model(model), GPT)
    monkeypatch.setattr(runtime, "process_memory_mb", lambda: (100.0, 100.0 + need - 0.01))
    assert isinstance(lora.sampling_model(model), lora.MergedOnRead)
    monkeypatch.setattr(runtime, "process_memory_mb", lambda: None)
    assert isinstance(lora.sampling_model(model), GPT)


def test_a_lora_run_sampling_merged_on_read_writes_the_same_files(char_base, data_dir, tmp_path, monkeypatch):
    from pocketgpt import runtime

    kw = dict(max_iters=4, eval_interval=2, learning_rate=1e-2, warmup_iters=0, eval_sample_tokens=24)
    train(lora_cfg(**kw), data_dir, tmp_path / "whole", initial_model=fresh(char_base), **QUIET)
    monkeypatch.setattr(runtime, "process_memory_mb", lambda: (1e9, 0.0))  # no merged copy fits
    monkeypatch.setattr(lora, "merged_model", None)  # and none is made
    train(lora_cfg(**kw), data_dir, tmp_path / "on-read", initial_model=fresh(char_base), **QUIET)
    a, b = tmp_path / "whole", tmp_path / "on-read"
    assert (a / rundir.SAMPLES).read_text() == (b / rundir.SAMPLES).read_text()
    for name in (rundir.BEST_WEIGHTS, rundir.ADAPTER, "last/model.safetensors"):
        assert safetensors_parts(a / name) == safetensors_parts(b / name)
    assert (tmp_path / "whole" / rundir.SAMPLES).read_text().count("=== iter") == 2


# ---------------------------------------------------------------- lora_base_dtype auto: speed where memory allows


@pytest.mark.parametrize("fast,fits,expected", [(True, True, "bfloat16"), (False, True, "float32"),
                                                (False, False, "bfloat16")])
def test_lora_base_dtype_auto_keeps_bfloat16_where_fast_or_needed(monkeypatch, fast, fits, expected):
    """A base of bfloat16 values stays bfloat16 where bf16 products are fast or a float32 copy would not fit
    comfortably; elsewhere it is widened once (the same numbers, no widening per product)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=37, block_size=24, n_layer=2, n_head=2, n_embd=16))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    cfg = build_train_config("finetune-lora", None, {"lora_rank": 2})
    monkeypatch.setattr(launching, "_fast_bf16_products", lambda c: fast)
    monkeypatch.setattr(launching, "float32_base_fits", lambda c, n: fits)
    said: list[str] = []
    launching.lora_base_dtype(cfg, model, said.append)
    assert cfg.lora.lora_base_dtype == expected
    assert model.transformer.h[0].attn.c_attn.weight.dtype == getattr(torch, expected)
    assert model.transformer.h[0].ln_1.weight.dtype == torch.float32
    text = " ".join(said)
    assert ("widened to float32 once" in text) == (expected == "float32")
    assert ("kept in bfloat16" in text) == (expected == "bfloat16")


def test_a_float32_base_fits_by_the_runs_estimate_against_the_machines_memory(monkeypatch):
    from pocketgpt import runtime

    cfg = build_train_config("finetune-lora", None, {"lora_rank": 2, "block_size": 512, "batch_size": 1})
    cfg.model = ModelConfig(**{**vars(cfg.model), "vocab_size": 151936, "n_layer": 28, "n_head": 16, "n_embd": 1024,
                               "head_size": 128, "n_kv_head": 8, "mlp": "swiglu", "mlp_width": 3072, "bias": False})
    n = cfg.model.param_count()  # the Qwen3-0.6B shape: 2.4 GB of float32 weights alone
    monkeypatch.setattr(runtime, "machine_memory_mb", lambda: 4096.0)
    assert not launching.float32_base_fits(cfg, n)  # a 4 GB laptop keeps the base bfloat16
    monkeypatch.setattr(runtime, "machine_memory_mb", lambda: 32768.0)
    assert launching.float32_base_fits(cfg, n)
    monkeypatch.setattr(runtime, "machine_memory_mb", lambda: 0.0)
    assert launching.float32_base_fits(cfg, n)  # unknown: the faster default
