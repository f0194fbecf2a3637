import pytest
import torch

from pocketgpt.config import ModelConfig
from pocketgpt.engine import Engine, pick_next
from pocketgpt.model import GPT


def make(block_size=16, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=23, block_size=block_size, n_layer=2, n_head=2, n_embd=16, **kw)
    return GPT(cfg).eval()


def test_nanogpt_cpu_shape_has_0_80m_parameters():
    cfg = ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False)
    assert GPT(cfg).num_params(non_embedding=True) == 795_904  # nanoGPT prints "0.80M"


def test_changing_a_later_token_never_changes_earlier_logits():
    model = make(dropout=0.0)
    idx = torch.randint(0, 23, (2, 16))
    base, _ = model(idx)
    for t in (3, 9, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 23
        out, _ = model(changed)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t:], base[:, t:])


def test_tied_embeddings_share_one_tensor():
    model = make()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="exceeds block_size"):
        make()(torch.zeros(1, 17, dtype=torch.long))


def test_greedy_generation_is_argmax_of_the_full_forward():
    model = make()
    prompt = [1, 2, 3]
    new = Engine(model).generate(prompt, 10, temperature=0.0)[0]
    seq = list(prompt)
    for _ in range(10):
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    assert new == seq[3:]


def test_seeded_sampling_is_reproducible_and_batched():
    eng = Engine(make())
    a = eng.generate([1, 2], 20, num_samples=3, temperature=1.0, seed=5)
    b = eng.generate([1, 2], 20, num_samples=3, temperature=1.0, seed=5)
    c = eng.generate([1, 2], 20, num_samples=3, temperature=1.0, seed=6)
    assert a == b and a != c
    assert len(a) == 3 and all(len(s) == 20 for s in a)
    assert len({tuple(s) for s in a}) > 1  # the samples in one batch differ


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[5.0, 5.0, 5.0, 5.0, 1.0, 0.0]])
    seen = {int(pick_next(logits, 1.0, 2, 1.0, torch.Generator().manual_seed(s))) for s in range(200)}
    assert len(seen) == 2 and seen <= {0, 1, 2, 3}


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(pick_next(logits, 1.0, 0, 0.75, torch.Generator().manual_seed(s))) for s in range(300)}
    assert seen == {0, 1}
    assert int(pick_next(logits, 1.0, 0, 0.01, None)) == 0  # the best token always survives


@pytest.mark.parametrize("arch", [{}, {"pos_emb": "rope", "qk_norm": True, "norm": "rmsnorm"}])
@pytest.mark.parametrize("bf16_attention", [False, True])
def test_cpu_bf16_autocast_runs_attention_in_the_chosen_dtype(monkeypatch, arch, bf16_attention):
    """Under CPU bf16 autocast the matmuls are bf16; attention gets fp32 q, k, v with autocast off (the
    default: this CPU's bf16 attention kernels are slow; RoPE's fp32 tables must not sneak a bf16 v
    past the check), or bf16 q, k, v under autocast where use_bf16_attention says the CPU measured them
    faster. Either way the loss and gradients stay close to float32's."""
    import pocketgpt.model as model_module

    seen = []
    real = model_module.F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    model = make(block_size=32, **arch).train()
    idx = torch.randint(0, 23, (4, 32))
    _, ref = model(idx, idx)
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    seen.clear()
    model_module.use_bf16_attention(model, bf16_attention)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    loss.backward()
    assert logits.dtype == torch.bfloat16  # the head ran in bf16: autocast is on
    dtype = torch.bfloat16 if bf16_attention else torch.float32
    assert seen == [(dtype, dtype, dtype, bf16_attention)] * model.config.n_layer
    assert abs(loss.item() - ref.item()) < (3e-2 if bf16_attention else 2e-2)
    for p, g in zip(model.parameters(), ref_grads):
        assert p.grad.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(p.grad.flatten(), g.flatten(), dim=0) > (0.97 if bf16_attention else 0.98)


def test_norms_are_the_textbook_formulas():
    from pocketgpt.model import LAYERNORM_EPS, RMSNORM_EPS, layer_norm, rms_norm

    x, w, b = torch.randn(3, 7, 16), torch.randn(16), torch.randn(16)
    centred = x - x.mean(-1, keepdim=True)
    want_ln = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + LAYERNORM_EPS) * w + b
    torch.testing.assert_close(layer_norm(x, w, b), want_ln, rtol=1e-5, atol=1e-5)
    want_rms = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + RMSNORM_EPS) * w
    torch.testing.assert_close(rms_norm(x, w, None), want_rms, rtol=1e-5, atol=1e-5)


def _block_names(layer_norm_bias: bool, linear_bias: bool) -> set[str]:
    names = {"ln_1.weight", "attn.c_attn.weight", "attn.c_proj.weight", "ln_2.weight", "mlp.c_fc.weight",
             "mlp.c_proj.weight"}
    if layer_norm_bias:
        names |= {"ln_1.bias", "ln_2.bias"}
    if linear_bias:
        names |= {"attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"}
    return {f"transformer.h.0.{n}" for n in names}


@pytest.mark.parametrize("opts,positions,ln_bias,bias", [
    ({}, True, False, False),
    ({"bias": True, "mlp": "gelu_new"}, True, True, True),
    ({"bias": True, "norm": "rmsnorm", "pos_emb": "rope", "mlp": "relu2"}, False, False, True),
])
def test_parameter_names_are_gpt2s_for_every_option(opts, positions, ln_bias, bias):
    """The checkpoint's keys (old run folders must load): GPT-2's names; RMSNorm has a gain only."""
    cfg = ModelConfig(vocab_size=23, block_size=16, n_layer=1, n_head=2, n_embd=16, **opts)
    want = {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"} | _block_names(ln_bias, bias)
    want |= {"transformer.wpe.weight"} if positions else set()
    want |= {"transformer.ln_f.bias"} if ln_bias else set()
    assert set(GPT(cfg).state_dict()) == want


def test_keep_mask_keeps_one_minus_p_and_scales_by_its_inverse():
    from pocketgpt.model import keep_mask

    torch.manual_seed(3)
    keep, scale = keep_mask(torch.Size([64, 128, 128]), 0.1, torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == (64, 128, 128)
    assert abs(keep.float().mean().item() - 0.9) < 2e-3  # 1M draws: the standard error is 3e-4
    assert scale == pytest.approx(65536 / (65536 - 6554))  # the rounded p's own inverse: E[keep * scale] = 1
    assert abs(keep[0].float().mean() - keep[-1].float().mean()) < 0.02  # every part of the mask draws alike
    other, _ = keep_mask(torch.Size([64, 128, 128]), 0.1, torch.device("cpu"))
    assert not torch.equal(keep, other)  # each call draws anew from torch's generator


def test_dropout_under_cpu_bf16_autocast_uses_the_cheap_mask_elsewhere_torchs(monkeypatch):
    from pocketgpt import model as model_module

    drop = model_module.Dropout(0.25).train()
    x = torch.ones(4096, requires_grad=True)
    torch.manual_seed(0)
    fp32 = drop(x)
    torch.manual_seed(0)
    assert torch.equal(fp32, torch.nn.functional.dropout(x, 0.25, True))  # float32: torch's numbers, unchanged
    calls = []
    real = model_module.keep_mask
    monkeypatch.setattr(model_module, "keep_mask", lambda *a: calls.append(a) or real(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = drop(x)
    assert len(calls) == 1
    y.sum().backward()
    kept = y.detach() != 0
    assert torch.allclose(x.grad[kept], torch.tensor(65536 / (65536 - 16384))) and (x.grad[~kept] == 0).all()
    assert torch.equal(drop.eval()(x), x)


def test_attention_with_dropout_under_cpu_bf16_is_the_written_out_form():
    from pocketgpt import model as model_module

    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 2, 16, 8) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model_module.attend_dropped(q, k, v, 1e-9)  # p rounds to 0: nothing dropped
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (y.float() - ref).abs().max() < 5e-2  # bf16 products
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dropped = model_module.attend_dropped(q, k, v, 0.5)
    assert not torch.allclose(dropped.float(), y.float(), atol=1e-2)


def test_cheap_dropout_edge_cases():
    from pocketgpt.model import keep_mask

    keep, scale = keep_mask(torch.Size([1000]), 0.999999, torch.device("cpu"))  # rounds to 65536: capped
    assert scale == 65536.0 and keep.shape == (1000,)
    model = make(block_size=16, dropout=0.2).to(torch.bfloat16).train()  # bf16 weights, no autocast
    logits, _ = model(torch.randint(0, 23, (2, 16)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("tied", [True, False])
def test_a_loss_in_slices_is_the_whole_loss_with_the_same_gradients(monkeypatch, tied):
    import pocketgpt.sizing as sizing

    torch.manual_seed(0)
    model = make(block_size=16, tie_embeddings=tied).train()
    idx, targets = torch.randint(0, 23, (3, 16)), torch.randint(0, 23, (3, 16))
    targets[0, :5] = -100  # positions out of the loss stay out of it
    logits, whole = model(idx, targets)
    assert logits is not None
    whole.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # 7 positions' logits per slice: 48 positions in 7 slices, the last one short
    monkeypatch.setattr(sizing, "LOSS_SLICE_BYTES", 7 * model.config.vocab_size * 4)
    logits, sliced = model(idx, targets)
    assert logits is None  # never held whole
    sliced.backward()
    assert torch.allclose(sliced, whole, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[n], atol=1e-6), n
    with torch.no_grad():  # an eval's forward: the same loss without the recomputation
        assert torch.allclose(model(idx, targets)[1], whole, atol=1e-6)


def test_a_frozen_bfloat16_head_gives_the_float32_loss_whole_and_in_slices(monkeypatch):
    import pocketgpt.sizing as sizing

    model = make(block_size=16).train()
    with torch.no_grad():  # bfloat16 values, as a LoRA base published in bfloat16 has
        model.lm_head.weight.copy_(model.lm_head.weight.to(torch.bfloat16))
    idx, targets = torch.randint(0, 23, (3, 16)), torch.randint(0, 23, (3, 16))
    _, wide = model(idx, targets)
    model.lm_head.weight.requires_grad_(False)
    model.lm_head.weight.data = model.lm_head.weight.data.to(torch.bfloat16)  # tied: the embedding too
    _, narrow = model(idx, targets)
    narrow.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setattr(sizing, "LOSS_SLICE_BYTES", 7 * model.config.vocab_size * 4)
    logits, sliced = model(idx, targets)
    assert logits is None
    sliced.backward()  # gradients reach the blocks through the widened head, made as each slice was
    assert expected and all(torch.allclose(p.grad, expected[n], atol=1e-6) for n, p in model.named_parameters()
                            if n in expected)
    assert torch.allclose(narrow, wide, atol=1e-6) and torch.allclose(sliced, wide, atol=1e-6)


def test_a_loss_in_slices_under_bf16_autocast_is_the_whole_loss(monkeypatch):
    """The slices' products run in autocast's dtype, as the whole loss's do: the same loss and gradients
    up to bfloat16 rounding, a loss scaled after it (gradient accumulation) scales them too."""
    import pocketgpt.sizing as sizing

    torch.manual_seed(0)
    model = make(block_size=16, tie_embeddings=False).train()
    idx, targets = torch.randint(0, 23, (3, 16)), torch.randint(0, 23, (3, 16))
    grads = []
    for slice_bytes in (sizing.LOSS_SLICE_BYTES, 7 * model.config.vocab_size * 4):
        monkeypatch.setattr(sizing, "LOSS_SLICE_BYTES", slice_bytes)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        (loss / 2).backward()
        grads.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (whole, g_whole), (sliced, g_sliced) = grads
    assert abs(whole - sliced) < 1e-2
    for n, g in g_whole.items():
        assert torch.allclose(g_sliced[n], g, atol=2e-3, rtol=5e-2), n
