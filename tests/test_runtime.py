import pytest
import torch

from pocketgpt.errors import PocketError
from pocketgpt.runtime import resolve


@pytest.mark.parametrize("flag, expected", [("1", torch.bfloat16), ("0", torch.float32)])
def test_auto_dtype_on_cpu_follows_bf16_support(monkeypatch, flag, expected):
    monkeypatch.setenv("POCKETGPT_CPU_BF16", flag)
    rt = resolve("cpu", "auto")
    assert rt.dtype == expected
    assert "auto" in rt.reason


def test_explicit_dtype_wins_over_detection(monkeypatch):
    monkeypatch.setenv("POCKETGPT_CPU_BF16", "1")
    assert resolve("cpu", "float32").dtype == torch.float32
    monkeypatch.setenv("POCKETGPT_CPU_BF16", "0")
    assert resolve("cpu", "bfloat16").dtype == torch.bfloat16


def test_float16_on_cpu_is_refused_with_a_way_out():
    with pytest.raises(PocketError, match="bfloat16 or float32"):
        resolve("cpu", "float16")
