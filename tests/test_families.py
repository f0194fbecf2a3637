"""Llama, Qwen2 and Qwen3 (arch/llama.py): Hugging Face folders in with transformers' logits (Llama 3's
scaled rotary positions too), runs out to Transformers, peft and GGUF, and a preset-shaped run refused
by every family, each saying why."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import TINY, hf_logits, max_diff, run_cli, train_tiny, untrained_run  # noqa: E402

from pocketgpt import arch  # noqa: E402
from pocketgpt.arch import llama  # noqa: E402
from pocketgpt.errors import PocketError  # noqa: E402
from pocketgpt.loading import load  # noqa: E402
from pocketgpt.model import GPT  # noqa: E402
from pocketgpt.tokenizer import CharTokenizer, GPT2Tokenizer  # noqa: E402

TOL = 1e-4
IDS = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 50256, 198, 40, 1101]
# a SwiGLU MLP of its own width, grouped-query attention (2 query heads per key/value head), a rotary
# base and norm epsilon of their own: what SmolLM2 and Qwen2.5 differ from GPT-2 in, at toy size
SHAPE = dict(vocab_size=50257, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=100000.0)


def hf_family_model(kind: str, seed: int = 0, **overrides) -> "transformers.PreTrainedModel":
    """A tiny random Llama, Qwen2 or Qwen3 (whose head_dim is 128 unless said), float32 eager attention;
    norms (Qwen3's q_norm / k_norm too) and biases randomised so mistakes there show."""
    torch.manual_seed(seed)
    cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                      "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                      "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[kind]
    cfg = cls(**{**SHAPE, **overrides}, attn_implementation="eager")
    m = model_cls(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.5)
    return m.eval()


@pytest.mark.parametrize("kind, tied", [("llama", False), ("llama", True), ("qwen2", True), ("qwen2", False),
                                        ("qwen3", True), ("qwen3", False)])
def test_a_hf_folder_loads_with_transformers_logits(tmp_path, kind, tied):
    d = tmp_path / kind
    hf_family_model(kind, tie_word_embeddings=tied).save_pretrained(str(d))
    lm = load(d)
    cfg = lm.model.config
    assert (cfg.n_kv_head, cfg.mlp, cfg.mlp_width, cfg.rope_theta, cfg.norm_eps) == (2, "swiglu", 48, 1e5, 1e-5)
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.tie_embeddings == tied
    assert cfg.qk_norm == cfg.qk_norm_gains == (kind == "qwen3")
    assert max_diff(lm.logits(IDS), hf_logits(d, IDS)) < TOL


# Qwen3 with a key/value head per query head and the width's own head size; with grouped-query attention
# and a head size apart from the width
@pytest.mark.parametrize("kv_heads, head_dim", [(4, 8), (2, 16)])
def test_qwen3_of_either_head_layout_loads_and_exports_back_with_transformers_logits(capsys, tmp_path, kv_heads,
                                                                                      head_dim):
    d = tmp_path / "qwen3"
    hf_family_model("qwen3", num_key_value_heads=kv_heads, head_dim=head_dim).save_pretrained(str(d))
    lm = load(d)
    assert (lm.model.config.kv_heads, lm.model.config.head_dim) == (kv_heads, head_dim)
    gains = lm.model.blocks[1].attn.k_norm.weight  # the learned gains came across
    assert gains.shape == (head_dim,) and (gains - 1).abs().max() > 0.1
    theirs = hf_logits(d, IDS)
    assert max_diff(lm.logits(IDS), theirs) < TOL
    code, _, err = _export(capsys, d, tmp_path / "export")
    assert code == 0, err
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "qwen3"
    assert max_diff(hf_logits(tmp_path / "export", IDS), theirs) < TOL


# Llama 3's rotary scaling with an original context of 64: of a head's 8 frequencies (base 1e5, head size
# 16) the fastest is kept, the next blended and the other six slowed by 4 (wavelengths 6.3, 26.5, 112, ...)
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
LLAMA3_SHAPE = dict(hidden_size=64, intermediate_size=96, max_position_embeddings=128,
                    rope_parameters={**LLAMA3, "rope_theta": 1e5})
LONG_IDS = torch.randint(0, 50257, (120,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.mark.parametrize("form, export_back", [("rope_parameters", True), ("rope_scaling", False)])
def test_llama3_scaled_rotary_positions_give_transformers_logits(capsys, tmp_path, form, export_back):
    d = tmp_path / "m"
    m = hf_family_model("llama", **LLAMA3_SHAPE)
    with torch.no_grad():  # sharper attention than the init's, so positions move the logits
        for name, p in m.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.normal_(0.0, 0.3)
    m.save_pretrained(str(d))
    if form == "rope_scaling":  # configs saved before transformers 5 (Llama 3.2's on the hub)
        raw = json.loads((d / "config.json").read_text())
        params = raw.pop("rope_parameters")
        raw.update(rope_theta=params.pop("rope_theta"), rope_scaling=params)
        (d / "config.json").write_text(json.dumps(raw))
    lm = load(d)
    cfg = lm.model.config
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_high_freq_factor, cfg.rope_original_context) == (
        "llama3", 4.0, 4.0, 64)
    theirs = hf_logits(d, LONG_IDS)
    assert max_diff(lm.logits(LONG_IDS), theirs) < TOL
    unscaled = GPT.from_state(dataclasses.replace(cfg, rope_scaling="none"), dict(lm.model.state_dict())).eval()
    with torch.no_grad():
        plain = unscaled(torch.tensor([LONG_IDS]))[0][0]
    assert max_diff(plain[64:], theirs[64:]) > 100 * TOL  # past the original context the scaling matters
    if not export_back:
        return
    code, _, err = _export(capsys, d, tmp_path / "export")
    assert code == 0, err
    assert json.loads((tmp_path / "export" / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    assert max_diff(hf_logits(tmp_path / "export", LONG_IDS), theirs) < TOL


def test_a_head_size_apart_from_the_width_loads(tmp_path):
    d = tmp_path / "m"
    hf_family_model("llama", head_dim=16).save_pretrained(str(d))  # 4 heads of 16 in a 32-wide model
    lm = load(d)
    assert lm.model.config.head_dim == 16 and lm.model.config.attn_width == 64
    assert max_diff(lm.logits(IDS), hf_logits(d, IDS)) < TOL


@pytest.mark.parametrize("kind, key, value, match", [
    ("llama", "rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "llama3 rope scaling lacks low_freq_factor"),
    ("llama", "rope_scaling", {**LLAMA3, "high_freq_factor": 1.0}, "0 < low_freq_factor < high_freq_factor"),
    ("llama", "hidden_act", "gelu", "hidden_act"), ("llama", "attention_bias", True, "attention_bias"),
    ("qwen3", "use_sliding_window", True, "use_sliding_window"),
    ("qwen3", "layer_types", ["sliding_attention", "full_attention"], "layer_types")])
def test_what_pocketgpt_cannot_compute_is_refused_by_key(tmp_path, kind, key, value, match):
    d = tmp_path / "m"
    hf_family_model(kind).save_pretrained(str(d))
    raw = json.loads((d / "config.json").read_text())
    raw.pop("rope_parameters", None) if key == "rope_scaling" else None
    (d / "config.json").write_text(json.dumps({**raw, key: value}))
    with pytest.raises(PocketError, match=match):
        load(d)


@pytest.mark.parametrize("form", ["rope_parameters", "rope_scaling"])
def test_a_rotary_scaling_pocketgpt_does_not_compute_is_one_line_naming_it(capsys, tmp_path, form):
    d = tmp_path / "m"
    hf_family_model("llama").save_pretrained(str(d))
    raw = json.loads((d / "config.json").read_text())
    raw[form] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 1e5}
    (d / "config.json").write_text(json.dumps(raw))
    capsys.readouterr()  # transformers' progress bars while saving
    code, _, err = run_cli(capsys, "sample", "--model", d, "--max-new-tokens", "2")
    assert code == 2 and err.count("\n") == 1
    assert "rope_type 'yarn' is not supported" in err and "llama3" in err


def _export(capsys, run: Path, out: Path, fmt: str = "hf") -> tuple[int, str, str]:
    return run_cli(capsys, "export", "--model", run, "--format", fmt, "--out", out)


LLAMA_RUN = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, mlp_width=48, rope_theta=5e5,
                 tie_embeddings=False)
QWEN3_RUN = {**LLAMA_RUN, "qk_norm": True, "qk_norm_gains": True}
# head size 16, base 5e5, original context 16: the fastest frequency blended, the seven others slowed by 4
LLAMA3_RUN = {**LLAMA_RUN, "rope_scaling": "llama3", "rope_factor": 4.0, "rope_original_context": 16}


@pytest.mark.parametrize("opts, family", [(LLAMA_RUN, "llama"), ({**LLAMA_RUN, "qkv_bias": True}, "qwen2"),
                                          ({**LLAMA_RUN, "tie_embeddings": True, "norm_eps": 1e-5}, "llama"),
                                          (QWEN3_RUN, "qwen3"), ({**QWEN3_RUN, "n_kv_head": 0}, "qwen3"),
                                          ({**QWEN3_RUN, "qk_norm_gains": False}, "qwen3"), (LLAMA3_RUN, "llama")])
def test_a_llama_shaped_run_exports_to_its_family_with_equal_logits(capsys, tmp_path, opts, family):
    run = untrained_run(tmp_path, GPT2Tokenizer(), **opts)
    out = tmp_path / "export"
    code, _, err = _export(capsys, run, out)
    assert code == 0, err
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == family
    ours = load(run).logits(IDS)
    assert max_diff(ours, hf_logits(out, IDS)) < TOL
    assert max_diff(load(out).logits(IDS), ours) < TOL  # and back into pocketgpt


# QK-norm as pocketgpt's presets train it: unit gains at float32's epsilon (1.2e-7), written to Qwen3 as gains
# of ones at rms_norm_eps (1e-6; one epsilon serves every norm there)
UNIT_QK_NORM = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True)


@pytest.mark.slow  # ~5-10 s each: 30 steps of training
@pytest.mark.parametrize("opts, family", [
    (UNIT_QK_NORM, "qwen3"), ({**UNIT_QK_NORM, "qk_norm_gains": True, "n_kv_head": 1}, "qwen3"),
    ({**UNIT_QK_NORM, "qk_norm": False, "rope_scaling": "llama3", "rope_original_context": 8}, "llama")])
def test_a_trained_run_exports_with_transformers_logits(capsys, tmp_path, data_dir, opts, family):
    run = train_tiny(tmp_path / "run", data_dir, **opts)
    code, _, err = _export(capsys, run, tmp_path / "export")
    assert code == 0, err
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == family
    lm = load(run)
    ids = lm.tokenizer.encode("ROMEO: but soft, what")[: TINY["block_size"]]
    assert max_diff(lm.logits(ids), hf_logits(tmp_path / "export", ids)) < TOL


def test_a_preset_shaped_run_is_refused_by_every_family_in_one_line(capsys, tmp_path):
    run = untrained_run(tmp_path, CharTokenizer("abc"), pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="relu2")
    code, _, err = _export(capsys, run, tmp_path / "export")
    assert code == 2 and err.count("\n") == 1
    assert "no architecture family can hold" in err
    assert all(f in err for f in ("GPT-2", "Llama", "Qwen2", "Qwen3", "relu2"))
    assert not (tmp_path / "export").exists()


def test_export_order_keeps_each_shape_in_its_family():
    from pocketgpt.config import ModelConfig

    shape = dict(vocab_size=50, n_layer=1, n_head=2, n_embd=16)
    assert arch.fitting(ModelConfig(**shape)).name == "gpt2"
    assert arch.fitting(ModelConfig(**shape, **LLAMA_RUN)).name == "llama"
    assert arch.fitting(ModelConfig(**shape, **LLAMA3_RUN), gguf=True).name == "llama"
    assert arch.fitting(ModelConfig(**shape, **QWEN3_RUN)).name == "qwen3"
    scaled_qwen3 = ModelConfig(**shape, **{**QWEN3_RUN, "rope_scaling": "llama3"})
    assert arch.fitting(scaled_qwen3).name == "qwen3"  # transformers' Qwen3 computes Llama 3's scaling too
    with pytest.raises(PocketError, match="llama.cpp's qwen3 has no rotary frequency factors") as e:
        arch.fitting(scaled_qwen3, gguf=True)  # llama.cpp's does not
    assert "\n" not in str(e.value)


def test_interleave_halves_is_llama_cpps_row_order():
    import numpy as np

    rows = np.arange(2 * 8).reshape(2 * 8, 1)  # 2 heads of 8: halves (0..3, 4..7)
    got = llama.interleave_halves(rows, heads=2)[:, 0].tolist()
    assert got == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.slow
def test_gguf_of_a_llama_run_holds_llamas_tensors_and_metadata(capsys, tmp_path):
    gguf = pytest.importorskip("gguf")
    run = untrained_run(tmp_path, GPT2Tokenizer(), **LLAMA_RUN)
    out = tmp_path / "m.gguf"
    code, _, err = _export(capsys, run, out, "gguf")
    assert code == 0, err
    reader = gguf.GGUFReader(str(out))
    fields = {f.name: f for f in reader.fields.values()}
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    assert arch == "llama"
    assert int(fields["llama.attention.head_count_kv"].parts[-1][0]) == 1
    assert float(fields["llama.rope.freq_base"].parts[-1][0]) == 5e5
    tensors = {t.name: t for t in reader.tensors}
    assert {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_gate.weight", "output.weight"} <= set(tensors)
    model = load(run).model
    q_ours = model.blocks[0].attn.c_attn.weight.detach()[:32].numpy()
    q_file = tensors["blk.0.attn_q.weight"].data.reshape(32, 32)
    assert (q_file == llama.interleave_halves(q_ours, heads=2)).all()


def _gguf_of_a_run(capsys, tmp_path: Path, **opts) -> tuple[Path, str, dict, dict]:
    """An untrained run of opts exported to GGUF and read back: (run, architecture, fields, tensors by name)."""
    gguf = pytest.importorskip("gguf")
    run = untrained_run(tmp_path, GPT2Tokenizer(), **opts)
    code, _, err = _export(capsys, run, tmp_path / "m.gguf", "gguf")
    assert code == 0, err
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    fields = {f.name: f for f in reader.fields.values()}
    return run, bytes(fields["general.architecture"].parts[-1]).decode(), fields, {t.name: t for t in reader.tensors}


@pytest.mark.slow
def test_gguf_of_a_qwen3_run_holds_its_qk_norm_gains_and_unpermuted_rows(capsys, tmp_path):
    run, arch_name, fields, tensors = _gguf_of_a_run(capsys, tmp_path, **QWEN3_RUN)
    assert arch_name == "qwen3"
    assert int(fields["qwen3.attention.head_count_kv"].parts[-1][0]) == 1
    assert int(fields["qwen3.attention.key_length"].parts[-1][0]) == 16
    assert float(fields["qwen3.attention.layer_norm_rms_epsilon"].parts[-1][0]) == pytest.approx(1e-6)
    attn = load(run).model.blocks[1].attn
    for ours, theirs in ((attn.q_norm, "blk.1.attn_q_norm.weight"), (attn.k_norm, "blk.1.attn_k_norm.weight")):
        assert (tensors[theirs].data == ours.weight.detach().numpy()).all()
    q_ours = attn.c_attn.weight.detach()[:32].numpy()  # qwen3 rotates halves as we do: rows as they are
    assert (tensors["blk.1.attn_q.weight"].data.reshape(32, 32) == q_ours).all()


def published_llama3_divisors(theta: float, head_size: int, factor: float, low: float, high: float,
                              context: int) -> list[float]:
    """Each rotary frequency's divisor under Llama 3's scaling, from the formula Meta published with
    Llama 3.1 (what llama.cpp's rope_freqs holds), written out here apart from pocketgpt's code."""
    out = []
    for i in range(0, head_size, 2):
        wavelength = 2 * math.pi / theta ** (-i / head_size)
        if wavelength < context / high:
            out.append(1.0)
        elif wavelength > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


@pytest.mark.slow
def test_gguf_of_a_llama3_scaled_run_holds_llama_cpps_rope_freqs(capsys, tmp_path):
    # original context 64 and base 1e4 put the head's 8 frequencies in all three regions
    _, arch_name, _, tensors = _gguf_of_a_run(capsys, tmp_path, **{**LLAMA3_RUN, "rope_theta": 1e4,
                                                                   "rope_original_context": 64})
    assert arch_name == "llama"
    got = tensors["rope_freqs.weight"].data.tolist()
    want = published_llama3_divisors(1e4, 16, 4.0, 1.0, 4.0, 64)
    assert got == pytest.approx(want, rel=1e-5)
    assert want[0] == 1.0 and 1.0 < want[1] < 4.0 and want[-1] == 4.0  # kept, blended, slowed


@pytest.mark.slow
def test_a_lora_run_on_qwen3_exports_an_adapter_peft_loads_onto_its_base(tmp_path, corpus_text):
    peft = pytest.importorskip("peft")
    from pocketgpt import launch as launching
    from pocketgpt import lora

    base = tmp_path / "base"
    hf_family_model("qwen3", head_dim=16).save_pretrained(str(base))
    book = tmp_path / "book.txt"
    book.write_text(corpus_text[:4000], encoding="utf-8")
    run_keys = {k: v for k, v in TINY.items() if k not in ("n_layer", "n_head", "n_embd", "block_size", "dropout")}
    overrides = {**run_keys, "lora_rank": 4, "lora_alpha": 8, "learning_rate": 1e-2, "warmup_iters": 0,
                 "max_iters": 4, "eval_interval": 2, "batch_size": 4, "block_size": 32}
    launching.launch(launching.TrainRequest(inputs=[str(book)], out=str(tmp_path / "run"), init_from=str(base),
                                            overrides=overrides), echo=lambda s: None)
    out = tmp_path / "adapter"
    assert lora.export_peft(tmp_path / "run", out) == []
    targets = json.loads((out / lora.PEFT_CONFIG).read_text())["target_modules"]
    assert set(targets) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(str(base), attn_implementation="eager",
                                                                dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf_base, str(out)).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([IDS])).logits[0]
    assert max_diff(theirs, load(tmp_path / "run").logits(IDS)) < TOL
    assert max_diff(theirs, hf_logits(base, IDS)) > 1e-3  # the adapter is applied


def _lora_on(base: Path, out: Path, book: Path, resume: bool = False, **extra) -> list[str]:
    from pocketgpt import launch as launching

    said: list[str] = []
    run_keys = {k: v for k, v in TINY.items() if k not in ("n_layer", "n_head", "n_embd", "block_size", "dropout")}
    overrides = {**run_keys, "lora_rank": 4, "lora_alpha": 8, "learning_rate": 1e-2, "warmup_iters": 0,
                 "max_iters": 6, "lr_decay_iters": 6, "eval_interval": 2, "batch_size": 4, "block_size": 32,
                 **extra}
    req = (launching.TrainRequest(out=str(out), resume=True, overrides=overrides) if resume else
           launching.TrainRequest(inputs=[str(book)], out=str(out), init_from=str(base), overrides=overrides))
    launching.launch(req, echo=said.append)
    return said


@pytest.mark.slow  # ~10 s: four short fine-tunes
def test_lora_over_a_bfloat16_base_keeps_it_bfloat16_with_the_same_losses_and_resumes_exactly(tmp_path, corpus_text):
    from safetensors import safe_open

    from helpers import metrics

    base = tmp_path / "base"
    hf_family_model("qwen3", head_dim=16).to(torch.bfloat16).save_pretrained(str(base))  # as Qwen3 ships
    book = tmp_path / "book.txt"
    book.write_text(corpus_text[:4000], encoding="utf-8")
    from pocketgpt.launch import load_base

    loaded = load_base(str(base), keep_bfloat16=True).model  # a LoRA base is never held as float32
    dtypes = {n: p.dtype for n, p in loaded.named_parameters()}
    assert dtypes["transformer.h.0.mlp.c_fc.weight"] == dtypes["transformer.wte.weight"] == torch.bfloat16
    assert dtypes["transformer.h.0.ln_1.weight"] == dtypes["transformer.h.0.attn.q_norm.weight"] == torch.float32
    said = _lora_on(base, tmp_path / "narrow", book, lora_base_dtype="bfloat16")  # (auto: test_lora.py)
    assert any("kept in bfloat16" in line and "the same numbers" in line for line in said)
    assert json.loads((tmp_path / "narrow" / "config.json").read_text())["lora"]["lora_base_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "narrow" / "last" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["transformer.h.0.attn.c_attn.weight"] == dtypes["transformer.wte.weight"] == "BF16"
    assert dtypes["transformer.h.0.attn.c_attn.lora_A.weight"] == dtypes["transformer.ln_f.weight"] == "F32"
    _lora_on(base, tmp_path / "wide", book, lora_base_dtype="float32")
    losses = lambda run, k="loss": {m["iter"]: m[k] for m in metrics(run) if k in m}  # noqa: E731
    assert losses(tmp_path / "narrow") == pytest.approx(losses(tmp_path / "wide"), abs=1e-5)
    assert losses(tmp_path / "narrow", "val_loss") == pytest.approx(losses(tmp_path / "wide", "val_loss"), abs=1e-5)
    assert max_diff(load(tmp_path / "narrow").logits(IDS), load(tmp_path / "wide").logits(IDS)) < TOL
    _lora_on(base, tmp_path / "resumed", book, max_iters=4, lora_base_dtype="bfloat16")
    _lora_on(base, tmp_path / "resumed", book, resume=True)
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "narrow"), abs=1e-6)
    # adapters on attention alone: the MLP's matrices, loaded bfloat16, are widened (nn.Linear computes them)
    _lora_on(base, tmp_path / "attn", book, max_iters=2, lora_targets="attn", lora_base_dtype="bfloat16")
    with safe_open(str(tmp_path / "attn" / "last" / "model.safetensors"), "pt") as f:
        assert f.get_slice("transformer.h.0.mlp.c_fc.weight").get_dtype() == "F32"
        assert f.get_slice("transformer.h.0.attn.c_attn.weight").get_dtype() == "BF16"
    # a float32 base (a run of ours) is not bfloat16 values: auto keeps it float32
    hf_family_model("qwen3", head_dim=16).save_pretrained(str(tmp_path / "base32"))
    _lora_on(tmp_path / "base32", tmp_path / "run32", book, max_iters=2)
    assert json.loads((tmp_path / "run32" / "config.json").read_text())["lora"]["lora_base_dtype"] == "float32"


@pytest.mark.parametrize("mlp, exports", [("relu2", False), ("swiglu", True)])
def test_a_finished_run_says_when_its_model_cannot_be_exported(capsys, tmp_path, data_dir, mlp, exports):
    from helpers import tiny_flags

    model = dict(pos_emb="rope", norm="rmsnorm", qk_norm="true", mlp=mlp, tie_embeddings="false")
    code, out, err = run_cli(capsys, "train", "--data", data_dir, "--out", tmp_path / "run",
                             *tiny_flags(max_iters=2, eval_interval=2, sample_tokens=0, plots="false", **model))
    assert code == 0, err
    said = [line for line in out.splitlines() if "cannot be exported" in line]
    assert (said == []) == exports
    if not exports:
        assert 'mlp = "relu2"' in said[0] and "--mlp swiglu" in said[0]
