"""The weights' moving average (optim.ema_decay): the rule, a run whose evals and saved model are the average
and that resumes exactly, and the refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pocketgpt import fsdp
from pocketgpt.config import build_train_config, check_lora
from pocketgpt.ema import WeightAverage, decay_at
from pocketgpt.errors import PocketError
from pocketgpt.trainer import train

from helpers import TINY, losses_by_iter, tiny_config


def test_the_decay_rises_to_its_setting():
    assert decay_at(0.99, 0) == pytest.approx(0.1)  # the first update keeps little of the starting weights
    assert decay_at(0.99, 10) == pytest.approx(11 / 20)
    assert decay_at(0.99, 10_000) == 0.99


def test_the_average_follows_the_rule_over_the_weights_that_train():
    torch.manual_seed(0)
    live = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    live[1].weight.requires_grad_(False)
    avg = WeightAverage(live, decay=0.9)
    want = [p.detach().clone() for p in live.parameters()]
    frozen_start = live[1].weight.detach().clone()
    for step in range(30):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn_like(p))
        avg.update(step)
        d = decay_at(0.9, step)
        want = [d * w + (1 - d) * p.detach() if p.requires_grad else w for w, p in zip(want, live.parameters())]
    for a, w in zip(avg.model.parameters(), want):
        assert torch.allclose(a, w, atol=1e-6)
    assert torch.equal(avg.model[1].weight, frozen_start)  # a frozen weight is never averaged
    assert not any(p.requires_grad for p in avg.model.parameters())


def test_a_run_with_an_average_evaluates_and_saves_it_and_resumes_exactly(data_dir, tmp_path):
    kw = dict(ema_decay=0.9, max_iters=30, lr_decay_iters=30, eval_interval=10, dropout=0.1, eval_sample_tokens=8)
    train(tiny_config(**kw), data_dir, tmp_path / "straight", echo=lambda s: None)
    last = tmp_path / "straight" / "last"
    average, live = load_file(str(last / "ema.safetensors")), load_file(str(last / "model.safetensors"))
    assert average.keys() == live.keys() and any(not torch.equal(average[k], live[k]) for k in live)
    vals = losses_by_iter(tmp_path / "straight", "val_loss")
    best = load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert vals[30] == min(vals.values())  # still learning: the last eval is the best
    assert all(torch.equal(best[k], average[k]) for k in average)  # the best checkpoint is the average
    plain = tmp_path / "plain"
    train(tiny_config(**{**kw, "ema_decay": 0.0}), data_dir, plain, echo=lambda s: None)
    assert losses_by_iter(plain) == pytest.approx(losses_by_iter(tmp_path / "straight"), abs=1e-5)  # same training
    other = losses_by_iter(plain, "val_loss")
    assert all(abs(other[i] - vals[i]) > 1e-4 for i in vals)  # measured on other weights
    train(tiny_config(**{**kw, "max_iters": 10}), data_dir, tmp_path / "resumed", echo=lambda s: None)
    train(tiny_config(**kw), data_dir, tmp_path / "resumed", resume=True, echo=lambda s: None)
    again = losses_by_iter(tmp_path / "resumed", "val_loss")
    assert again.keys() == vals.keys() and all(abs(again[i] - vals[i]) <= 1e-5 for i in vals)


@pytest.mark.parametrize("keys,message", [
    ({"ema_decay": 1.0}, r"ema_decay must be zero \(off\) or in \(0, 1\)"),
    ({"ema_decay": -0.5}, "ema_decay must be zero"),
])
def test_bad_decays_are_refused_by_name(keys, message):
    with pytest.raises(PocketError, match=message):
        build_train_config(preset=None, overrides={**TINY, **keys})


def test_an_average_with_lora_or_fsdp_is_refused_by_name():
    with pytest.raises(PocketError, match="drop --ema-decay with LoRA"):
        check_lora(tiny_config(ema_decay=0.99, lora_rank=4), has_base=True)
    with pytest.raises(PocketError, match="fsdp does not keep an average"):
        fsdp.check(tiny_config(ema_decay=0.99, parallel="fsdp"))
