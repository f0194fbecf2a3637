"""probe.py: matmul rates measured once per machine and cached; the CPU's bf16 choice follows them."""

from __future__ import annotations

import json

import pytest
import torch

from pocketgpt import probe, runtime

CPU = torch.device("cpu")
SHAPES = [(64, 32, 96), (64, 32, 65)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(probe, "_load", lambda: 0.5)  # a steady machine, unless a test says otherwise
    return tmp_path / probe.CACHE_FILE


def test_a_rate_is_measured_once_then_read_from_the_cache(cache, monkeypatch):
    rate = probe.matmul_rate(CPU, torch.float32, SHAPES, seconds=0.01)
    assert rate > 1e6  # even a slow CPU does a million FLOP/s
    saved = json.loads(cache.read_text())
    (key,) = saved
    assert "float32" in key and "64x32x96 64x32x65" in key and probe.cpu_name() in key
    monkeypatch.setattr(probe, "_best_time", lambda *a: pytest.fail("measured again"))
    assert probe.matmul_rate(CPU, torch.float32, SHAPES) == rate
    with pytest.raises(pytest.fail.Exception):  # another dtype (or shape) is another measurement
        probe.matmul_rate(CPU, torch.bfloat16, SHAPES)


def test_rate_is_total_flops_over_summed_times(cache, monkeypatch):
    times = {(10, 10, 10): 1e-3, (10, 10, 30): 1e-3}
    monkeypatch.setattr(probe, "_best_time", lambda device, dtype, shape, seconds: times[shape])
    assert probe.matmul_rate(CPU, torch.float32, list(times)) == pytest.approx((2000 + 6000) / 2e-3)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"k": "text"}'])
def test_an_unreadable_cache_is_measured_again(cache, content):
    cache.write_text(content)
    assert probe.matmul_rate(CPU, torch.float32, SHAPES, seconds=0.01) > 0
    assert len(json.loads(cache.read_text())) == 1  # rewritten whole, the bad entries gone


def test_model_shapes_cover_the_blocks_and_head_with_rows_capped():
    from pocketgpt.config import ModelConfig

    M = probe.MAX_ROWS
    shapes = probe.model_shapes(ModelConfig(n_embd=64, n_head=4, vocab_size=65), rows=100_000)
    assert shapes == [(M, 64, 192), (M, 64, 64), (M, 64, 256), (M, 256, 64), (M, 64, 65)]
    # the config's own widths: grouped-query attention, a head size apart from the width, a gated MLP
    llama = ModelConfig(n_embd=64, n_head=4, n_kv_head=2, head_size=8, mlp="swiglu", mlp_width=96, vocab_size=65)
    assert probe.model_shapes(llama, rows=10) == [(10, 64, 32 + 16 + 16), (10, 32, 64), (10, 64, 192), (10, 96, 64),
                                                  (10, 64, 65)]


@pytest.mark.parametrize("speedup, expected", [(2.4, torch.bfloat16), (1.1, torch.float32)])
def test_auto_dtype_on_a_bf16_cpu_follows_the_measured_speedup(monkeypatch, speedup, expected):
    monkeypatch.delenv("POCKETGPT_CPU_BF16", raising=False)
    monkeypatch.setattr(runtime, "_cpuinfo_has_bf16", lambda: True)
    monkeypatch.setattr(runtime, "_measured_bf16_speedup", lambda: speedup)
    rt = runtime.resolve("cpu", "auto")
    assert rt.dtype == expected and f"{speedup:.1f}x float32" in rt.reason
    assert runtime.cpu_has_fast_bf16() == (expected == torch.bfloat16)


def test_a_cpu_without_bf16_instructions_is_not_measured(monkeypatch):
    monkeypatch.delenv("POCKETGPT_CPU_BF16", raising=False)
    monkeypatch.setattr(runtime, "_cpuinfo_has_bf16", lambda: False)
    monkeypatch.setattr(runtime, "_measured_bf16_speedup", lambda: pytest.fail("measured"))
    rt = runtime.resolve("cpu", "auto")
    assert rt.dtype == torch.float32 and "no bfloat16 matmul instructions" in rt.reason


def test_a_remeasure_keeps_the_higher_rate(cache, monkeypatch):
    """Load only slows a probe down: a later, faster measurement replaces a slow one, never the reverse."""
    times = iter([2e-3, 1e-3, 4e-3])
    monkeypatch.setattr(probe, "_best_time", lambda *a: next(times))
    shape = [(10, 10, 10)]
    slow = probe.matmul_rate(CPU, torch.float32, shape)
    assert probe.matmul_rate(CPU, torch.float32, shape, remeasure=True) == 2 * slow
    assert probe.matmul_rate(CPU, torch.float32, shape, remeasure=True) == 2 * slow  # 4e-3 measured, not kept
    assert probe.matmul_rate(CPU, torch.float32, shape) == 2 * slow


def test_a_rate_measured_on_a_busier_machine_is_measured_again(cache, monkeypatch):
    times = iter([4e-3, 1e-3])
    monkeypatch.setattr(probe, "_best_time", lambda *a: next(times))
    shape = [(10, 10, 10)]
    monkeypatch.setattr(probe, "_load", lambda: 3.0)  # the first probe met a busy machine
    busy = probe.matmul_rate(CPU, torch.float32, shape)
    assert probe.matmul_rate(CPU, torch.float32, shape) == busy  # as busy now: the cached rate
    monkeypatch.setattr(probe, "_load", lambda: 0.1)
    assert probe.matmul_rate(CPU, torch.float32, shape) == 4 * busy  # quieter now: measured again
    assert json.loads(cache.read_text())[probe._key(CPU, torch.float32, shape)]["load"] == 0.1
    assert probe.matmul_rate(CPU, torch.float32, shape) == 4 * busy  # and kept (no third measurement)


def test_the_bf16_choice_is_measured_once_and_kept(cache, monkeypatch):
    """Even on a quieter machine later: a run and its resume (and the ranks of one torchrun) must agree."""
    speed = {torch.float32: 1e-3, torch.bfloat16: 4e-4}
    monkeypatch.setattr(probe, "_best_time", lambda device, dtype, shape, seconds: speed[dtype])
    assert probe.bf16_speedup(CPU) == pytest.approx(2.5)
    monkeypatch.setattr(probe, "_best_time", lambda *a: pytest.fail("measured again"))
    monkeypatch.setattr(probe, "_load", lambda: 0.0)  # quieter than when measured: still kept
    assert probe.bf16_speedup(CPU) == pytest.approx(2.5)


def test_no_home_folder_falls_back_to_the_temporary_folder(monkeypatch):
    import tempfile
    from pathlib import Path

    monkeypatch.delenv("POCKETGPT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert probe.cache_dir() == Path(tempfile.gettempdir()) / "pocketgpt"


def test_attention_speedup_is_measured_once_per_shape_then_kept(cache, monkeypatch):
    """Both dtypes are measured at the model's shape (its batch capped), twice in turns, then the ratio
    is read back: a resume or another rank must make the same choice."""
    calls = []

    def timed(device, dtype, shape, seconds):
        calls.append((dtype, shape))
        return {torch.float32: 2e-3, torch.bfloat16: 4e-3}[dtype]

    monkeypatch.setattr(probe, "_attention_time", timed)
    assert probe.attention_bf16_speedup(CPU, batch=100, n_head=4, seq=64, head_size=32) == pytest.approx(0.5)
    capped = (probe.ATTENTION_MAX_HEADS // 4, 4, 64, 32)
    assert probe.attention_probe_shape(100, 4, 64, 32) == capped
    assert calls == [(torch.float32, capped), (torch.bfloat16, capped)] * 2
    monkeypatch.setattr(probe, "_attention_time", lambda *a: pytest.fail("measured again"))
    monkeypatch.setattr(probe, "_load", lambda: 0.0)  # even on a quieter machine: kept
    assert probe.attention_bf16_speedup(CPU, batch=100, n_head=4, seq=64, head_size=32) == pytest.approx(0.5)
    with pytest.raises(pytest.fail.Exception):  # another shape is another measurement
        probe.attention_bf16_speedup(CPU, batch=8, n_head=4, seq=128, head_size=32)


def test_attention_probe_really_times_a_forward_and_backward(cache):
    rate = probe.attention_rate(CPU, torch.float32, (2, 2, 16, 8), seconds=0.01)
    assert rate > 1e5
    (key,) = json.loads(cache.read_text())
    assert "attention 2x2x16x8" in key and "float32" in key


@pytest.mark.parametrize("speedup, bf16", [(2.0, True), (1.1, True), (1.05, False), (0.3, False)])
def test_cpu_attention_choice_follows_the_measurement(monkeypatch, speedup, bf16):
    monkeypatch.delenv("POCKETGPT_CPU_ATTENTION", raising=False)
    monkeypatch.setattr(probe, "attention_bf16_speedup", lambda *a: speedup)
    on, why = runtime.cpu_attention_choice(16, 4, 64, 32)
    assert on is bf16 and why.startswith("attention in " + ("bf16" if bf16 else "fp32")) and "measured" in why


@pytest.mark.parametrize("flag", ["bf16", "fp32"])
def test_cpu_attention_choice_can_be_forced(monkeypatch, flag):
    monkeypatch.setenv("POCKETGPT_CPU_ATTENTION", flag)
    monkeypatch.setattr(probe, "attention_bf16_speedup", lambda *a: pytest.fail("measured"))
    assert runtime.cpu_attention_choice(16, 4, 64, 32)[0] is (flag == "bf16")


def test_a_long_context_probes_fewer_rows():
    """GPT-2's context: one row (a probe near a second), not 64 / 12 = 5 (~50 GFLOP a call)."""
    assert probe.attention_probe_shape(8, 12, 1024, 64) == (1, 12, 1024, 64)
    assert probe.attention_probe_shape(16, 4, 256, 64) == (16, 4, 256, 64)  # cpu-hour: as it runs
    assert probe.attention_probe_shape(2.0, 4, 64, 32.0) == (2, 4, 64, 32)  # one key whatever the types


def test_a_bad_attention_override_is_named(monkeypatch):
    from pocketgpt.errors import PocketError

    monkeypatch.setenv("POCKETGPT_CPU_ATTENTION", "bfloat16")
    with pytest.raises(PocketError, match="POCKETGPT_CPU_ATTENTION must be bf16 or fp32, got 'bfloat16'"):
        runtime.cpu_attention_choice(16, 4, 64, 32)
