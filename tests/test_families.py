"""Llama and Qwen2 (arch/llama.py): Hugging Face folders in with transformers' logits, runs out to
Transformers, peft and GGUF, and a preset-shaped run refused by every family, each saying why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import hf_logits, max_diff, run_cli, untrained_run  # noqa: E402

from pocketgpt.arch import llama  # noqa: E402
from pocketgpt.loading import load  # noqa: E402
from pocketgpt.tokenizer import CharTokenizer, GPT2Tokenizer  # noqa: E402

TOL = 1e-4
IDS = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 50256, 198, 40, 1101]
# a SwiGLU MLP of its own width, grouped-query attention (2 query heads per key/value head), a rotary
# base and norm epsilon of their own: what SmolLM2 and Qwen2.5 differ from GPT-2 in, at toy size
SHAPE = dict(vocab_size=50257, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=100000.0)


def hf_family_model(kind: str, seed: int = 0, **overrides) -> "transformers.PreTrainedModel":
    """A tiny random Llama or Qwen2, float32 eager attention; norms and biases randomised so mistakes there show."""
    torch.manual_seed(seed)
    cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                      "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    cfg = cls(**{**SHAPE, **overrides}, attn_implementation="eager")
    m = model_cls(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.5)
    return m.eval()


@pytest.mark.parametrize("kind, tied", [("llama", False), ("llama", True), ("qwen2", True), ("qwen2", False)])
def test_a_hf_folder_loads_with_transformers_logits(tmp_path, kind, tied):
    d = tmp_path / kind
    hf_family_model(kind, tie_word_embeddings=tied).save_pretrained(str(d))
    lm = load(d)
    cfg = lm.model.config
    assert (cfg.n_kv_head, cfg.mlp, cfg.mlp_width, cfg.rope_theta, cfg.norm_eps) == (2, "swiglu", 48, 1e5, 1e-5)
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.tie_embeddings == tied
    assert max_diff(lm.logits(IDS), hf_logits(d, IDS)) < TOL


def test_a_head_size_apart_from_the_width_loads(tmp_path):
    d = tmp_path / "m"
    hf_family_model("llama", head_dim=16).save_pretrained(str(d))  # 4 heads of 16 in a 32-wide model
    lm = load(d)
    assert lm.model.config.head_dim == 16 and lm.model.config.attn_width == 64
    assert max_diff(lm.logits(IDS), hf_logits(d, IDS)) < TOL


@pytest.mark.parametrize("key, value", [("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
                                        ("hidden_act", "gelu"), ("attention_bias", True)])
def test_what_pocketgpt_cannot_compute_is_refused_by_key(tmp_path, key, value):
    d = tmp_path / "m"
    hf_family_model("llama").save_pretrained(str(d))
    raw = json.loads((d / "config.json").read_text())
    raw.pop("rope_parameters", None) if key == "rope_scaling" else None
    (d / "config.json").write_text(json.dumps({**raw, key: value}))
    with pytest.raises(Exception, match="llama3|hidden_act|attention_bias"):
        load(d)


def _export(capsys, run: Path, out: Path, fmt: str = "hf") -> tuple[int, str, str]:
    return run_cli(capsys, "export", "--model", run, "--format", fmt, "--out", out)


LLAMA_RUN = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, mlp_width=48, rope_theta=5e5,
                 tie_embeddings=False)


@pytest.mark.parametrize("opts, family", [(LLAMA_RUN, "llama"), ({**LLAMA_RUN, "qkv_bias": True}, "qwen2"),
                                          ({**LLAMA_RUN, "tie_embeddings": True, "norm_eps": 1e-5}, "llama")])
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


def test_a_preset_shaped_run_is_refused_by_every_family_in_one_line(capsys, tmp_path):
    run = untrained_run(tmp_path, CharTokenizer("abc"), pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="relu2")
    code, _, err = _export(capsys, run, tmp_path / "export")
    assert code == 2 and err.count("\n") == 1
    assert "no architecture family can hold" in err and all(f in err for f in ("GPT-2", "Llama", "Qwen2", "relu2"))
    assert not (tmp_path / "export").exists()


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
