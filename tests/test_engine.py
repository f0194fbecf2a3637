"""The generation engine's own decode path (Decoder), its sampling and its low-precision choice.

tests/test_model.py covers the model's KV cache, greedy = argmax, the sliding window, seeds and
top-k / top-p through Engine; these tests cover what engine.py adds on top.
"""

import pytest
import torch

from pocketgpt import engine as engine_mod
from pocketgpt.config import ModelConfig
from pocketgpt.engine import Decoder, Engine, low_precision_candidates, probe_logit_diff, sample
from pocketgpt.errors import PocketError
from pocketgpt.model import GPT

ARCHS = {
    "gpt2": {},
    "gpt2-bias-untied": {"bias": True, "tie_embeddings": False},
    "modern": {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "relu2"},
}


def make(block_size: int = 16, scale: float = 0.3, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=23, block_size=block_size, n_layer=2, n_head=2, n_embd=16, **kw)
    model = GPT(cfg).eval()
    with torch.no_grad():  # larger than the init's 0.02, so differences in the math would show
        for p in model.parameters():
            p.normal_(0.0, scale)
    return model


def decode_all(dec: Decoder, idx: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits at every position from prefill tokens, then one-token steps: (B, T, V)."""
    cache = dec.new_cache(idx.size(0), idx.device)
    out = [dec.prefill(idx[:, :prefill], cache, all_logits=True)]
    out += [dec.step(idx[:, t], cache)[:, None] for t in range(prefill, idx.size(1))]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_prefill_and_steps_equal_the_full_forward(arch):
    model = make(**ARCHS[arch])
    idx = torch.randint(0, 23, (3, 16))
    with torch.inference_mode():
        full, _ = model(idx)
        for prefill in (1, 5, 16):
            got = decode_all(Decoder(model), idx, prefill)
            torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


def test_prefill_last_position_only_and_full_cache_refused():
    model = make()
    dec = Decoder(model)
    idx = torch.randint(0, 23, (2, 16))
    with torch.inference_mode():
        full, _ = model(idx)
        cache = dec.new_cache(2, idx.device)
        torch.testing.assert_close(dec.prefill(idx, cache), full[:, -1], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="full"):
            dec.step(idx[:, 0], cache)
        with pytest.raises(ValueError, match="empty cache"):
            dec.prefill(idx[:, :2], cache)


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_greedy_past_the_context_is_argmax_of_the_held_window(arch):
    # the window slides by re-prefilling the newest block_size // 2 tokens; with rotary positions
    # as with learned ones, each token is the argmax of a plain forward over that window
    model = make(block_size=8, **ARCHS[arch])
    prompt = [1, 2, 3, 4, 5]
    new = Engine(model).generate(prompt, 30, temperature=0.0)[0]
    seq, start = list(prompt), 0
    for tok in new:
        if len(seq) - start > 8:
            start = len(seq) - 4
        logits, _ = model(torch.tensor([seq[start:]]))
        assert tok == int(logits[0, -1].argmax())
        seq.append(tok)


def test_batched_samples_are_one_batch_and_seeded():
    eng = Engine(make())
    a = eng.generate([3], 40, num_samples=4, temperature=1.0, seed=11)
    assert a == eng.generate([3], 40, num_samples=4, temperature=1.0, seed=11)
    assert len({tuple(s) for s in a}) == 4  # every row draws its own random numbers
    steps = list(eng.stream([3], 5, num_samples=4, seed=11))
    assert all(s.shape == (4,) for s in steps)
    ticks = []  # the progress hook of `pocketgpt sample --num-samples N`: once per generated token
    assert eng.generate([3], 40, num_samples=4, temperature=1.0, seed=11, on_step=lambda: ticks.append(1)) == a
    assert len(ticks) == 40


def test_sample_follows_the_distribution_and_never_draws_zero_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0], [0.0, 0.0, 0.0, 2.0, 2.0]])  # rows need not sum to 1
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(probs, gen) for _ in range(4000)])  # (4000, 2)
    freq = torch.bincount(draws[:, 0], minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]), atol=0.03, rtol=0)
    assert set(draws[:, 1].tolist()) == {3, 4}
    one_hot = torch.zeros(1, 7)
    one_hot[0, 6] = 1.0  # the last id, where u * total could round up to the total
    assert all(int(sample(one_hot, gen)) == 6 for _ in range(50))


def test_sampling_does_not_touch_the_global_rng():
    model = make()
    before = torch.get_rng_state()
    Engine(model).generate([1], 20, seed=3)
    Engine(model).generate([1], 20)  # unseeded: its own generator, seeded from the OS
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_steps_stay_within_1e_2_of_float32(dtype):
    if dtype == torch.bfloat16 and torch.bfloat16 not in low_precision_candidates():
        pytest.skip("this CPU has no native bfloat16 matmuls")
    model = make(scale=0.1, **ARCHS["gpt2-bias-untied"])
    idx = torch.randint(0, 23, (2, 16))
    with torch.inference_mode():
        full, _ = model(idx)
        got = decode_all(Decoder(model, dtype), idx, prefill=4)
    assert got.dtype == torch.float32
    assert torch.equal(got[:, :4], decode_all(Decoder(model), idx, prefill=4)[:, :4])  # prefill is float32
    assert float((got - full).abs().max()) <= 1e-2
    assert probe_logit_diff(Decoder(model, dtype), torch.device("cpu")) <= 1e-2


def test_auto_keeps_float32_for_small_models():
    eng = Engine(make())
    assert eng.step_dtype == torch.float32 and eng.logit_diffs == {}  # no probe run


def test_auto_uses_low_precision_only_when_the_probe_passes(monkeypatch):
    monkeypatch.setattr(engine_mod, "LOW_PRECISION_MIN_PARAMS", 0)
    monkeypatch.setattr(engine_mod, "low_precision_candidates", lambda: [torch.float16])
    model = make(scale=0.1)
    before = torch.get_rng_state()
    eng = Engine(model)
    assert eng.step_dtype == torch.float16 and 0 < eng.logit_diffs["float16"] <= 1e-2
    assert torch.equal(before, torch.get_rng_state())  # the probe draws from its own generator
    monkeypatch.setattr(engine_mod, "LOGIT_TOLERANCE", 0.0)  # no 16-bit decode can pass this
    strict = Engine(model)
    assert strict.step_dtype == torch.float32 and strict.logit_diffs["float16"] > 0
    greedy = strict.generate([1, 2], 10, temperature=0)
    assert greedy == Engine(model, decode_dtype="float32").generate([1, 2], 10, temperature=0)


def test_decoder_is_rebuilt_when_the_weights_change():
    model = make()
    eng = Engine(model, decode_dtype="float16")  # float16 steps hold copies: they must not go stale
    first = eng.decoder()
    assert eng.decoder() is first
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # an in-place update, as an optimizer step makes
    assert eng.decoder() is not first
    new = eng.generate([1, 2, 3], 1, temperature=0)[0]
    logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert new == [int(logits[0, -1].argmax())]


def test_bad_decode_dtype_is_refused():
    with pytest.raises(PocketError, match="decode_dtype"):
        Engine(make(), decode_dtype="float8")
