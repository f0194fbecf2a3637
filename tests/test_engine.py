"""The generation engine: its decoder (decoder.py), its sampling and its low-precision choice.

tests/test_model.py covers the model's KV cache, greedy = argmax, the sliding window, seeds and
top-k / top-p through Engine; these tests cover what decoder.py and engine.py add on top: the
decoder equal to the full forward for every architecture option, the repetition penalty, stop
token ids and per-sample stopping, and generations that interleave without touching the caller's
thread count. tests/test_batch.py covers many generations in one batch.
"""

import math
import re
import threading
from pathlib import Path

import pytest
import torch

from pocketgpt import decoder as decoder_mod
from pocketgpt import engine as engine_mod
from pocketgpt.config import MLPS, ModelConfig
from pocketgpt.decoder import Decoder, low_precision_candidates, probe_logit_diff
from pocketgpt.engine import Engine, penalize, sample
from pocketgpt.errors import PocketError
from pocketgpt.model import GPT
from pocketgpt.sampling import SamplingSettings

ARCHS = {
    "gpt2": {},
    "gpt2-bias-untied": {"bias": True, "tie_embeddings": False},
    "gpt2-gelu-tanh": {"mlp": "gelu_new", "bias": True},
    "modern": {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "relu2"},
    # what the open families add: grouped-query attention (2 query heads per key/value head), a gated
    # MLP of its own width, the rotary base, the norm's epsilon, q/k/v biases, a head size apart from the width
    "gqa-learned": {"n_kv_head": 1, "bias": True},
    "llama": {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 1, "mlp_width": 24,
              "rope_theta": 500000.0, "norm_eps": 1e-5, "tie_embeddings": False},
    "qwen": {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qkv_bias": True, "head_size": 12,
             "qk_norm": True, "n_kv_head": 1, "rope_theta": 1e6, "norm_eps": 1e-6},
    # QK-norm's learned gains (Qwen3): alone (q and k one tensor in the split without them), and with
    # grouped-query attention and a head size of its own
    "qk-gains": {"qk_norm": True, "qk_norm_gains": True, "bias": True},
    "qwen3": {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "head_size": 12, "qk_norm": True,
              "qk_norm_gains": True, "n_kv_head": 1, "rope_theta": 1e6, "norm_eps": 1e-5, "tie_embeddings": False},
    # Llama 3's scaled rotary positions, with an original context short enough that every region counts
    "llama3-rope": {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 1, "rope_scaling": "llama3",
                    "rope_factor": 4.0, "rope_original_context": 16, "rope_high_freq_factor": 8.0},
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
    steps = list(eng.start([3], SamplingSettings(max_new_tokens=5, num_samples=4, seed=11)))
    assert len(steps) == 5 and all(len(s) == 4 for s in steps)
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
    monkeypatch.setattr(decoder_mod, "LOW_PRECISION_MIN_PARAMS", 0)
    monkeypatch.setattr(decoder_mod, "low_precision_candidates", lambda: [torch.float16])
    model = make(scale=0.1)
    before = torch.get_rng_state()
    eng = Engine(model)
    assert eng.step_dtype == torch.float16 and 0 < eng.logit_diffs["float16"] <= 1e-2
    assert torch.equal(before, torch.get_rng_state())  # the probe draws from its own generator
    monkeypatch.setattr(decoder_mod, "LOGIT_TOLERANCE", 0.0)  # no 16-bit decode can pass this
    strict = Engine(model)
    assert strict.step_dtype == torch.float32 and strict.logit_diffs["float16"] > 0
    greedy = strict.generate([1, 2], 10, temperature=0)
    assert greedy == Engine(model, decode_dtype="float32").generate([1, 2], 10, temperature=0)


@pytest.mark.parametrize("rows_fast", [True, False])
def test_float16_steps_for_many_rows_only_where_their_matmuls_measured_fast(monkeypatch, rows_fast):
    monkeypatch.setattr(decoder_mod, "LOW_PRECISION_MIN_PARAMS", 0)
    monkeypatch.setattr(decoder_mod, "low_precision_candidates", lambda: [torch.float16])
    monkeypatch.setattr(decoder_mod, "float16_rows_fast", lambda: rows_fast)
    eng = Engine(make(scale=0.1))
    assert eng.decoder().step_dtype == torch.float16  # one row: fast on any AVX-512 CPU
    assert eng.decoder(many_rows=True).step_dtype == (torch.float16 if rows_fast else torch.float32)


def test_float16_rows_speedup_is_measured_once_and_kept(monkeypatch, tmp_path):
    from pocketgpt import probe

    monkeypatch.setenv("POCKETGPT_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(probe, "_best_time", lambda dev, dt, shape, s: calls.append(dt) or (1.0 if dt == torch.float32 else 0.5))
    assert probe.float16_rows_speedup(torch.device("cpu")) == pytest.approx(2.0)
    assert sorted(set(calls), key=str) == [torch.float16, torch.float32]
    calls.clear()
    assert probe.float16_rows_speedup(torch.device("cpu")) == pytest.approx(2.0) and calls == []  # kept


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


def test_a_decode_dtype_asked_for_builds_one_decoder_for_one_and_many_rows():
    eng = Engine(make(), decode_dtype="float16")  # one float16 copy of the weights, not two
    assert eng.decoder(many_rows=True) is eng.decoder() and eng.decoder().step_dtype == torch.float16


def test_bad_decode_dtype_is_refused():
    with pytest.raises(PocketError, match="decode_dtype"):
        Engine(make(), decode_dtype="float8")


# ---------------------------------------------------------------- the model's math, through one door


def test_every_activation_is_covered_by_the_decoder_check():
    assert {a.get("mlp", "gelu") for a in ARCHS.values()} == set(MLPS)


def _tanh_gelu(h: torch.Tensor) -> torch.Tensor:
    """GPT-2's activation as its paper writes it, independent of torch's implementation."""
    return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h.pow(3))))


def test_gelu_new_is_gpt2s_tanh_gelu_in_training_and_decoding():
    exact, tanh = make(mlp="gelu"), make(mlp="gelu_new")  # the same seed: the same weights
    tanh.load_state_dict(exact.state_dict())  # and the same parameter names
    mlp = tanh.transformer.h[0].mlp
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(mlp(x), mlp.c_proj(_tanh_gelu(mlp.c_fc(x))), rtol=1e-5, atol=1e-6)
    idx = torch.randint(0, 23, (2, 16))
    with torch.inference_mode():
        a, b = exact(idx)[0], tanh(idx)[0]
        assert (a - b).abs().max() > 1e-4  # the option is really wired: the two activations differ
        torch.testing.assert_close(decode_all(Decoder(tanh), idx, 4), b, rtol=1e-5, atol=1e-5)
        assert (decode_all(Decoder(exact), idx, 4) - b).abs().max() > 1e-4


ENGINE_MODULES = (engine_mod, decoder_mod)


def engine_code() -> str:
    """The engine's modules without their comments (comments may mention what the code must not name)."""
    sources = [Path(m.__file__).read_text(encoding="utf-8") for m in ENGINE_MODULES]
    return "\n".join(line.split("#")[0] for source in sources for line in source.splitlines())


def test_the_engine_names_no_module_attribute_of_the_model():
    names = "transformer|c_attn|c_proj|c_fc|ln_1|ln_2|ln_f|lm_head|rope_cos|rope_sin|attn|mlp|eps"
    assert re.findall(rf"\.({names})\b", engine_code()) == []


def test_the_engine_names_no_architecture():
    # what an architecture option is (an activation, a norm, positions, the q/k/v layout) comes from
    # decode_view(); the engine's code reads none of the config's architecture fields
    code = engine_code()
    fields = "pos_emb|norm|qk_norm|mlp|gated|tie_embeddings|qkv_bias|rope_theta|norm_eps|bias"
    assert re.findall(rf"\bcfg\.({fields})\b", code) == []
    assert re.findall(r"gelu|relu|swiglu|silu|rms_norm|layer_norm|rotate|gpt2|llama|qwen", code, re.I) == []


def test_decode_view_shares_the_parameters_storage():
    model = make(**ARCHS["gpt2-bias-untied"])
    view = model.decode_view()
    params = {p.data_ptr() for p in model.parameters()}
    layer = view.layers[0]
    tensors = [view.wte, view.wpe, view.head, *view.norm_f, *layer.norm_1, layer.attn_w, layer.fc_b]
    assert all(t.data_ptr() in params for t in tensors)
    assert not any(t.requires_grad for t in tensors)


# ---------------------------------------------------------------- repetition penalty


def test_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize(logits, seen, 2.0).tolist() == [[1.0, -4.0, 3.0, -1.0]]
    assert torch.equal(penalize(logits, seen, 1.0), logits)


def test_greedy_with_repetition_penalty_follows_the_definition():
    model = make(block_size=32)
    prompt, p = [1, 2, 3, 1], 1.7
    got = Engine(model).generate(prompt, 20, temperature=0, repetition_penalty=p)[0]
    seq = list(prompt)
    for _ in range(20):  # Hugging Face's loop: every id in prompt + output so far, once each
        logits = model(torch.tensor([seq]))[0][0, -1]
        for t in set(seq):
            logits[t] = logits[t] / p if logits[t] > 0 else logits[t] * p
        seq.append(int(logits.argmax()))
    assert got == seq[len(prompt):]
    assert got != Engine(model).generate(prompt, 20, temperature=0)[0]  # it changed something


# ---------------------------------------------------------------- stopping


def test_each_sample_ends_at_its_own_stop_token_and_the_loop_when_all_have():
    eng = Engine(make())
    s = SamplingSettings(max_new_tokens=30, temperature=1.0, num_samples=4, seed=2)
    free = eng.generate([3], s)
    stop_id = free[0][5]
    firsts = [row.index(stop_id) if stop_id in row else None for row in free]
    ticks = []
    got = eng.generate([3], s, stop_token_ids=[stop_id], on_step=lambda: ticks.append(1))
    # a finished row rides along unused, so the other rows draw the same numbers as without stops
    assert got == [row[:i] if i is not None else row for row, i in zip(free, firsts)]
    stream = eng.start([3], s, stop_token_ids=[stop_id])
    steps = list(stream)
    assert len(ticks) == len(steps) == (30 if None in firsts else max(firsts) + 1)
    for row, i in enumerate(firsts):
        assert stream.finish_reasons[row] == ("length" if i is None else "stop")
        assert stream.completion_tokens[row] == (30 if i is None else i + 1)  # the stop token counts
        assert all(step[row] is None for step in steps[(30 if i is None else i):])
    assert stream.prompt_tokens == 1


def test_stop_from_the_text_layer_ends_one_row():
    stream = Engine(make()).start([1, 2], SamplingSettings(max_new_tokens=10, num_samples=2, seed=0))
    first = next(stream)
    stream.stop(0)
    rest = list(stream)
    assert all(isinstance(t, int) for t in first) and len(rest) == 9
    assert all(step[0] is None and isinstance(step[1], int) for step in rest)
    assert stream.finish_reasons == ["stop", "length"] and stream.completion_tokens == [1, 10]


def test_zero_new_tokens_and_bad_prompts():
    eng = Engine(make())
    stream = eng.start([1], SamplingSettings(max_new_tokens=0))
    assert list(stream) == [] and stream.finish_reasons == ["length"] and stream.completion_tokens == [0]
    with pytest.raises(PocketError, match="prompt is empty"):
        eng.start([], SamplingSettings())
    with pytest.raises(PocketError, match="context is 16"):
        eng.start([1] * 17, SamplingSettings())


# ---------------------------------------------------------------- the cache's room


def test_a_generation_has_room_for_its_tokens_not_the_declared_context():
    # issue 25: a model declaring 4096 positions, a 5-token prompt and 10 new tokens: room for 15
    cfg = (model := make(block_size=4096)).config
    stream = Engine(model).start([1, 2, 3, 4, 5], SamplingSettings(max_new_tokens=10, num_samples=3, seed=0))
    cache = stream.batch.cache
    assert cache.k.shape == cache.v.shape == (cfg.n_layer, 3, cfg.kv_heads, 15, cfg.head_dim)
    assert cache.nbytes == 2 * cfg.n_layer * 3 * cfg.kv_heads * 15 * cfg.head_dim * 4
    assert [len(step) for step in stream] == [3] * 10 and stream.batch.cache is cache  # it never grew


def test_a_generation_past_the_context_has_room_for_the_context_and_slides():
    model = make(block_size=8)
    stream = Engine(model).start([1, 2, 3], SamplingSettings(max_new_tokens=30, temperature=0))
    assert stream.batch.cache.capacity == 8
    slid = []
    real = stream.batch._prefill
    stream.batch._prefill = lambda rows: (slid.append(rows.fill.size(1)), real(rows))
    assert len(list(stream)) == 30
    # the model reads 3 + 29 tokens: 8 fill the positions, then each slide keeps the newest
    # block_size // 2 (the new token among them) and 4 steps fill them again: 5 slides
    assert slid == [4] * 5


def steps_with_logits(stream) -> list:
    """Per step: the ids, the logprobs records and the logits they were drawn from."""
    return [(ids, stream.last_logprobs, stream.rows.logits.clone()) for ids in stream]


def assert_same_steps(a: list, b: list) -> None:
    assert [(ids, lp) for ids, lp, _ in a] == [(ids, lp) for ids, lp, _ in b]
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(a, b))  # bit for bit


@pytest.mark.parametrize("arch,dtype", [("gpt2", "float32"), ("llama", "float32"), ("qwen", "float16"),
                                        ("gpt2", "bfloat16")])
def test_the_room_a_cache_has_changes_no_logit(arch, dtype):
    # what a generation gives with room for its own tokens is what a cache of the whole context gave
    # (the engine before issue 25), bit for bit, whatever the settings and the step matrices' dtype
    from pocketgpt.engine import DecodeBatch

    engine = Engine(make(block_size=64, **ARCHS[arch]), decode_dtype=dtype)
    s = SamplingSettings(max_new_tokens=20, temperature=0.9, top_k=8, top_p=0.9, repetition_penalty=1.2,
                         seed=3, num_samples=2, logprobs=2)
    tight = engine.start([1, 2, 3, 4, 5], s, stop_token_ids=[4])
    whole = DecodeBatch(engine, 2, shared=False, positions=64).start([1, 2, 3, 4, 5], s, stop_token_ids=[4])
    assert (tight.batch.cache.capacity, whole.batch.cache.capacity) == (25, 64)
    assert_same_steps(steps_with_logits(tight), steps_with_logits(whole))


def test_a_cache_refuses_tokens_past_its_room():
    dec = Decoder(make(block_size=64))
    idx = torch.randint(0, 23, (2, 4))
    with torch.inference_mode():
        assert dec.new_cache(1, idx.device, positions=100).capacity == 64  # never past the context
        cache = dec.new_cache(2, idx.device, positions=3)
        with pytest.raises(ValueError, match="room"):
            dec.prefill(idx, cache)
        dec.prefill(idx[:, :3], cache)
        with pytest.raises(ValueError, match="full"):
            dec.step(idx[:, 3], cache)
        with pytest.raises(ValueError, match="full"):
            dec.step_rows(idx[:, 3], torch.tensor([3, 3]), cache, slice(0, 2))
        with pytest.raises(ValueError, match="full"):
            dec.step_rows(idx[:0, 0], idx[:0, 0], cache, slice(0, 0), [(0, idx)])


def test_the_low_precision_probe_has_room_for_its_own_tokens_only(monkeypatch):
    monkeypatch.setattr(decoder_mod, "LOW_PRECISION_MIN_PARAMS", 0)
    monkeypatch.setattr(decoder_mod, "low_precision_candidates", lambda: [torch.float16])
    rooms, real = [], Decoder.new_cache

    def spy(self, *args, **kwargs):
        cache = real(self, *args, **kwargs)
        rooms.append(cache.capacity)
        return cache

    monkeypatch.setattr(Decoder, "new_cache", spy)
    engine = Engine(make(block_size=4096))
    engine.generate([1, 2], 5)
    assert "float16" in engine.logit_diffs  # the probe ran
    assert rooms == [24, 24, 7]  # the probe's 8 + 16 tokens twice, then the generation's 2 + 5


# ---------------------------------------------------------------- generations side by side


def test_streams_run_on_their_own_threads_and_leave_the_callers_alone(monkeypatch):
    eng = Engine(make())
    assert eng.threads == 1  # a small model decodes on one thread
    inside = []
    real_step = Decoder.step

    def spy(self, tok, cache):
        inside.append((torch.get_num_threads(), torch.is_inference_mode_enabled()))
        return real_step(self, tok, cache)

    monkeypatch.setattr(Decoder, "step", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stream = eng.start([1, 2], SamplingSettings(max_new_tokens=6, seed=1))
        for _ in stream:  # between steps the caller's settings are back
            assert torch.get_num_threads() == 2 and not torch.is_inference_mode_enabled()
        assert torch.get_num_threads() == 2
        assert inside == [(1, True)] * 5  # the engine's own work: one thread, inference mode
    finally:
        torch.set_num_threads(before)


def test_interleaved_streams_give_what_each_gives_alone():
    eng = Engine(make(block_size=8))  # 40 tokens: the window slides several times
    a = SamplingSettings(max_new_tokens=40, temperature=1.0, seed=1)
    b = SamplingSettings(max_new_tokens=40, temperature=0.7, top_k=5, seed=2, num_samples=2, repetition_penalty=1.3)
    alone = eng.generate([1, 2], a), eng.generate([4], b)
    sa, sb = eng.start([1, 2], a), eng.start([4], b)
    got: tuple[list, list] = ([], [])
    for x, y in zip(sa, sb):  # a step of one, then a step of the other
        got[0].append(x)
        got[1].append(y)
    assert [list(r) for r in zip(*got[0])] == alone[0] and [list(r) for r in zip(*got[1])] == alone[1]


def test_a_stream_in_another_thread_gives_the_same_tokens():
    eng = Engine(make())
    s = SamplingSettings(max_new_tokens=20, seed=9)
    out = []
    worker = threading.Thread(target=lambda: out.append(eng.generate([5], s)))
    worker.start()
    worker.join()
    assert out == [eng.generate([5], s)]


def test_uniform_draws_come_in_blocks_but_in_the_order_of_one_per_step():
    # a stream takes its generator's draws 32 steps at a time; they are the numbers one draw per
    # step gives, so the same seed gives the same ids as before blocks and alone or batched alike
    from pocketgpt.engine import uniforms

    eng = Engine(make(block_size=64))
    stream = eng.start([1], SamplingSettings(max_new_tokens=50, temperature=1.0, seed=5, num_samples=3))
    gen = torch.Generator().manual_seed(5)
    for _ in range(50):  # past a block boundary
        torch.testing.assert_close(stream.uniform_draws(), uniforms(3, gen, torch.device("cpu")), rtol=0, atol=0)


# ---------------------------------------------------------------- threads that follow the machine's load


def test_a_big_models_engine_threads_follow_the_load_step_by_step(monkeypatch):
    """Quiet: torch's count; another program busy on one of 2 cores: one thread from the next steps on,
    the decoder's steps run on it; back up when the program stops. (A tiny model stands in for a big one.)"""
    from pocketgpt import cpuload
    from test_cpuload import Machine

    machine = Machine(cores=2, busy=0, threads=2)
    monkeypatch.setattr(engine_mod, "SINGLE_THREAD_PARAMS", 0)
    monkeypatch.delenv("POCKETGPT_THREADS", raising=False)
    real_watch = cpuload.LoadWatch
    monkeypatch.setattr(cpuload, "LoadWatch", lambda cores: real_watch(2, machine.read, machine.clock, interval=0.0))
    seen = []
    real_step = Decoder.step
    monkeypatch.setattr(Decoder, "step", lambda self, *a: seen.append(torch.get_num_threads()) or real_step(self, *a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        eng = Engine(make())
        assert eng.threads == 2
        eng.generate([1, 2], 4, temperature=0)
        assert seen and set(seen) == {2}
        machine.busy = 1
        for _ in range(3):  # two windows agree, then the count drops
            machine.threads = eng.threads
        assert eng.threads == 1
        seen.clear()
        eng.generate([1, 2], 4, temperature=0)
        assert set(seen) == {1} and torch.get_num_threads() == 2  # the caller's count put back
        machine.busy = 0
        for _ in range(3):
            machine.threads = eng.threads
        assert eng.threads == 2
        eng.threads = 1  # a count asked for is kept, whatever the load
        machine.busy = 0
        assert [eng.threads for _ in range(4)] == [1] * 4
    finally:
        torch.set_num_threads(before)


def test_engine_threads_stay_fixed_for_small_models_and_a_count_asked_for(monkeypatch):
    from pocketgpt.engine import load_threads

    model = make()
    assert load_threads(model, torch.device("cpu")) is None and Engine(model).threads == 1  # tiny steps: one thread
    monkeypatch.setattr(engine_mod, "SINGLE_THREAD_PARAMS", 0)
    monkeypatch.setenv("POCKETGPT_THREADS", "2")
    assert load_threads(model, torch.device("cpu")) is None
    monkeypatch.delenv("POCKETGPT_THREADS")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert load_threads(model, torch.device("cpu")) is None  # nothing to follow with one thread
        torch.set_num_threads(2)
        follows = load_threads(model, torch.device("cpu"))
        assert follows is not None and follows.ceiling == 2 and follows.count == 2
    finally:
        torch.set_num_threads(before)
