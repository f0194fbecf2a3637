"""sizing.py: parameter and FLOP counts, GPU peaks, and the `--preset auto` rule; the CLI wiring."""

import json

import pytest

from helpers import run_cli
from pocketgpt.config import ModelConfig
from pocketgpt.errors import PocketError
from pocketgpt.sizing import (DROPOUT_PASSES, TOKENS_PER_PARAM, estimate_memory_mb, gpu_peak_flops, parse_memory,
                              plan_auto)

SHAKESPEARE = dict(train_tokens=1_003_854, val_tokens=111_540, vocab_size=65)
CPU = 60e9  # training FLOP/s


def test_flops_per_token_matches_a_hand_count():
    # 1 layer, C=4, T=8, 100 matmul parameters: 6*100 = 600 for the weights (2 forward + 4 backward);
    # attention: QK^T and AV are T*C multiply-adds each per token = 2*8*4*2 = 128 FLOPs forward,
    # 3x with backward = 384 = 12*1*4*8
    one = ModelConfig(n_layer=1, n_embd=4, n_head=1, block_size=8)
    assert one.flops_per_token(100) == 600 + 384
    two = ModelConfig(n_layer=2, n_embd=4, n_head=1, block_size=8)
    assert two.flops_per_token(0) == 2 * one.flops_per_token(0)
    # attention's width is the heads' (Qwen3-0.6B: 16 heads of 128 in a 1024-wide model)
    assert ModelConfig(n_layer=1, n_embd=4, n_head=2, head_size=4, block_size=8).flops_per_token(0) == 12 * 8 * 8


SHAPES = [
    dict(pos_emb="rope", norm="rmsnorm", tie_embeddings=False),
    dict(pos_emb="learned", tie_embeddings=True),
    dict(pos_emb="learned", tie_embeddings=False, bias=True),
    dict(n_kv_head=1, mlp="swiglu", mlp_width=40, head_size=12, qkv_bias=True, pos_emb="rope", norm="rmsnorm"),
    dict(n_kv_head=3, mlp="swiglu", bias=True, tie_embeddings=False),
    dict(n_kv_head=1, mlp="swiglu", head_size=12, pos_emb="rope", norm="rmsnorm", qk_norm=True, qk_norm_gains=True),
]


@pytest.mark.parametrize("opts", SHAPES)
def test_param_count_matches_the_model(opts):
    from pocketgpt.model import GPT

    cfg = ModelConfig(vocab_size=70, n_layer=3, n_head=3, n_embd=48, block_size=32, **opts)
    model = GPT(cfg)
    assert cfg.param_count() == model.num_params()
    # the matmul count: everything but the (untied) input embedding and a learned position table
    indexed = (0 if cfg.tie_embeddings else 70 * 48) + (32 * 48 if cfg.pos_emb == "learned" else 0)
    assert cfg.matmul_params() == model.num_params() - indexed


def test_gpu_peak_table():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", True) == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", True) == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-40GB", False) == 19.5e12
    assert gpu_peak_flops("NVIDIA A10G", True) != gpu_peak_flops("NVIDIA A100-SXM4-40GB", True)
    assert gpu_peak_flops("Some Future GPU", True) is None


def test_bigger_budget_never_gives_a_smaller_model():
    sizes = [plan_auto(**SHAKESPEARE, seconds=s, memory_mb=8000, flops_per_s=CPU).params
             for s in (10, 60, 300, 600, 1800, 3600, 36000)]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]


def test_tiny_corpus_gets_a_small_model():
    big = plan_auto(**SHAKESPEARE, seconds=3600, memory_mb=8000, flops_per_s=CPU)
    tiny = plan_auto(train_tokens=3000, val_tokens=300, vocab_size=65, seconds=3600, memory_mb=8000, flops_per_s=CPU)
    assert tiny.params < big.params
    assert tiny.keys["block_size"] < 300 and tiny.keys["dropout"] > 0  # many passes over 3k tokens


def test_memory_cap_is_respected():
    free = plan_auto(**SHAKESPEARE, seconds=36000, memory_mb=64000, flops_per_s=1e12)
    capped = plan_auto(**SHAKESPEARE, seconds=36000, memory_mb=30, flops_per_s=1e12)
    assert capped.params < free.params and capped.memory_mb <= 30
    k = capped.keys
    cfg = ModelConfig(vocab_size=65, n_layer=k["n_layer"], n_head=k["n_head"], n_embd=k["n_embd"],
                      block_size=k["block_size"])
    from types import SimpleNamespace
    state, acts = estimate_memory_mb(SimpleNamespace(model=cfg, run=SimpleNamespace(batch_size=k["batch_size"])),
                                     capped.params)
    assert state + acts <= 30
    with pytest.raises(PocketError, match="max-memory"):
        plan_auto(**SHAKESPEARE, seconds=600, memory_mb=0.5, flops_per_s=CPU)


def test_plan_uses_the_measured_recipe():
    p = plan_auto(**SHAKESPEARE, seconds=600, memory_mb=8000, flops_per_s=CPU)
    assert p.keys["optimizer"] == "muon" and p.keys["schedule"] == "wsd" and p.keys["pos_emb"] == "rope"
    assert p.keys["n_embd"] % p.keys["n_head"] == 0 and p.keys["max_time"] == 600
    assert p.tokens_expected >= TOKENS_PER_PARAM * p.params and "parameters" in p.reasons[0]


def test_dropout_follows_the_passes_over_the_corpus():
    for seconds in (60, 300, 600, 1800, 3600, 36000):
        p = plan_auto(**SHAKESPEARE, seconds=seconds, memory_mb=8000, flops_per_s=CPU)
        passes = p.tokens_expected / SHAKESPEARE["train_tokens"]
        assert (p.keys["dropout"] > 0) == (passes > DROPOUT_PASSES), (seconds, passes)
        assert p.keys["attention_dropout"] is False  # a CPU step pays ~25 % for it in attention
    short = plan_auto(**SHAKESPEARE, seconds=60, memory_mb=8000, flops_per_s=CPU)
    long = plan_auto(**SHAKESPEARE, seconds=36000, memory_mb=8000, flops_per_s=CPU)
    assert short.keys["dropout"] == 0 and long.keys["dropout"] > 0


def test_the_rule_picks_the_largest_shape_with_enough_tokens():
    from pocketgpt.sizing import LADDER, auto_model

    p = plan_auto(**SHAKESPEARE, seconds=600, memory_mb=8000, flops_per_s=CPU)
    k = p.keys
    chosen = LADDER.index((k["n_layer"], k["n_embd"], k["block_size"]))
    bigger = auto_model(*LADDER[chosen + 1], 65)
    assert 600 * CPU / bigger.flops_per_token() < TOKENS_PER_PARAM * bigger.param_count()


@pytest.mark.parametrize("text,mb", [("4GB", 4096), ("512MB", 512), ("1.5g", 1536), ("800", 800)])
def test_parse_memory(text, mb):
    assert parse_memory(text) == mb


def test_parse_memory_rejects_nonsense():
    with pytest.raises(PocketError, match="4GB"):
        parse_memory("lots")


@pytest.mark.slow
def test_cli_auto_prints_why_and_trains(tmp_path, capsys, data_dir):
    code, out, err = run_cli(capsys, "train", "--preset", "auto", "--max-time", "2s", "--max-memory", "1GB",
                             "--data", data_dir, "--out", tmp_path / "r", "--eval-sample-tokens", 0,
                             "--sample-tokens", 0, "--plots", "false")
    assert code == 0, err
    assert "tokens expected in 2s" in out and "rule:" in out and "ms/iter estimated" in out
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["optim"]["optimizer"] == "muon" and saved["run"]["max_time"] == 2
    assert saved["run"]["eval_sample_tokens"] == 0  # command-line keys still win over the plan


@pytest.mark.parametrize("argv,message", [
    (["train", "--max-memory", "1GB"], "--preset auto"),
    (["train", "--preset", "auto", "--max-memory", "lots"], "cannot read 'lots'"),
])
def test_cli_auto_errors(tmp_path, capsys, data_dir, argv, message):
    code, _, err = run_cli(capsys, *argv, "--data", data_dir, "--out", tmp_path / "r")
    assert code == 2 and message in err


def test_bf16_on_cpu_assumes_the_measured_speed_up_and_nowhere_else():
    from pocketgpt.sizing import CPU_BF16_SPEEDUP, EFFICIENCY, training_flops

    assert training_flops(100e9, "cpu", False) == pytest.approx(100e9 * EFFICIENCY["cpu"])
    assert training_flops(100e9, "cpu", True) == pytest.approx(100e9 * EFFICIENCY["cpu"] * CPU_BF16_SPEEDUP)
    assert training_flops(100e9, "cuda", True) == training_flops(100e9, "cuda", False)
