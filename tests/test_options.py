"""Architecture and optimizer options: each keeps the model causal, cache-exact, trainable and resumable."""

import pytest
import torch

import pocketgpt
from pocketgpt.config import ModelConfig
from pocketgpt.decoder import Decoder
from pocketgpt.model import GPT
from pocketgpt.optim import Muon, make_optimizers, orthogonalize
from pocketgpt.trainer import train

from helpers import metrics, tiny_config

OPTIONS = [
    {},
    {"pos_emb": "rope"},
    {"norm": "rmsnorm"},
    {"qk_norm": True},
    {"mlp": "relu2"},
    {"tie_embeddings": False},
    {"zero_init_proj": True},
    {"n_kv_head": 1},
    {"mlp": "swiglu"},
    {"mlp_width": 24},
    {"head_size": 12},
    {"qkv_bias": True},
    {"norm_eps": 1e-3},
    {"pos_emb": "rope", "rope_theta": 500000.0},
    {"qk_norm": True, "qk_norm_gains": True},
    {"pos_emb": "rope", "rope_scaling": "llama3", "rope_original_context": 16},
    {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 1, "mlp_width": 24, "head_size": 12,
     "qkv_bias": True, "qk_norm": True, "norm_eps": 1e-6, "rope_theta": 1e6, "tie_embeddings": False},
    {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "relu2", "tie_embeddings": False,
     "zero_init_proj": True},
]


def build(**opts) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=29, block_size=16, n_layer=2, n_head=2, n_embd=16, **opts)).eval()
    if opts.get("zero_init_proj"):  # give the zeroed projections weights, as training would
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("c_proj.weight"):
                    p.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "+".join(o) or "gpt2")
def test_option_is_causal_and_cache_exact(opts):
    model = build(**opts)
    idx = torch.randint(0, 29, (2, 16))
    full, _ = model(idx)
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 29
    assert torch.equal(model(changed)[0][:, :10], full[:, :10])
    dec = Decoder(model)
    cache = dec.new_cache(2, idx.device)
    with torch.inference_mode():
        parts = [dec.prefill(idx[:, :6], cache, all_logits=True)] + [dec.step(idx[:, t], cache)[:, None]
                                                                     for t in range(6, 16)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_options_change_the_network():
    assert "wpe" not in build(pos_emb="rope").transformer
    untied = build(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()
    assert build(tie_embeddings=False).num_params() == build().num_params() + 29 * 16
    zero = GPT(ModelConfig(vocab_size=29, block_size=16, n_layer=2, n_head=2, n_embd=16, zero_init_proj=True))
    assert all(p.abs().sum() == 0 for n, p in zero.named_parameters() if n.endswith("c_proj.weight"))


def test_orthogonalize_pushes_singular_values_towards_one():
    torch.manual_seed(0)
    for shape in [(192, 64), (64, 256), (96, 48)]:  # (square random matrices are near-singular)
        g = torch.randn(shape) * torch.linspace(0.1, 3.0, shape[1])  # unevenly scaled directions
        o = orthogonalize(g)
        s = torch.linalg.svdvals(o)
        assert s.min() > 0.5 and s.max() < 1.3, (shape, s.min(), s.max())  # input spread: ~30x
        assert (o * g).sum() > 0  # still a descent direction


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    from pocketgpt.config import OptimConfig

    model = build()
    adamw, muon = make_optimizers(model, OptimConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(muon, Muon)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon_ids) == (name.startswith("transformer.h.") and p.dim() == 2), name
    assert len(make_optimizers(model, OptimConfig(), torch.device("cpu"))) == 1


@pytest.mark.slow  # four options, 80 steps of training each (a run, and a run stopped and resumed)
@pytest.mark.parametrize("opts", [OPTIONS[-1], {"optimizer": "muon"}, {**OPTIONS[-1], "optimizer": "muon"},
                                  {"optimizer": "muon", "dtype": "bfloat16"}],
                         ids=["modern-arch", "muon", "modern+muon", "muon-bf16-cheap-dropout"])
def test_options_train_and_resume_exactly(opts, data_dir, tmp_path):
    kw = dict(lr_decay_iters=40, eval_interval=20, dropout=0.1, **opts)
    train(tiny_config(max_iters=40, **kw), data_dir, tmp_path / "a", echo=lambda s: None)
    train(tiny_config(max_iters=20, **kw), data_dir, tmp_path / "b", echo=lambda s: None)
    train(tiny_config(max_iters=40, **kw), data_dir, tmp_path / "b", resume=True, echo=lambda s: None)
    a = {m["iter"]: m["loss"] for m in metrics(tmp_path / "a") if "loss" in m}
    b = {m["iter"]: m["loss"] for m in metrics(tmp_path / "b") if "loss" in m}
    assert a == pytest.approx(b, abs=1e-5)
    assert a[40] < a[1] - 0.5  # it learns
    m = pocketgpt.load(tmp_path / "a")  # and the saved weights load back into the same architecture
    assert m.logits([1, 2, 3]).shape == (3, m.tokenizer.vocab_size)


def test_batched_orthogonalize_equals_each_matrix_alone():
    torch.manual_seed(1)
    g = torch.randn(4, 96, 32)
    alone = torch.stack([orthogonalize(m) for m in g])
    assert torch.allclose(orthogonalize(g), alone, atol=1e-5)
    half = orthogonalize(g, dtype=torch.bfloat16)  # bf16 runs: the same directions, to bf16's precision
    assert half.dtype == torch.float32 and (half - alone).abs().max() < 3e-2
    assert (torch.linalg.svdvals(half) - torch.linalg.svdvals(alone)).abs().max() < 5e-2


def test_muon_step_equals_the_per_matrix_rule():
    """Grouping by shape is only a speed-up: each matrix moves by -lr * scale * orthogonalize(g + m * buf)."""
    torch.manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(48, 16), (16, 16), (48, 16), (16, 64)]]
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    opt = Muon(params, lr=0.02, momentum=0.9)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            bufs[i] = 0.9 * bufs[i] + g
            scale = max(1.0, ref[i].size(0) / ref[i].size(1)) ** 0.5
            ref[i] = ref[i] - 0.02 * scale * orthogonalize(g + 0.9 * bufs[i])
    for p, r in zip(params, ref):
        assert torch.allclose(p.detach(), r, atol=1e-6)


def test_cautious_weight_decay_shrinks_only_where_the_step_agrees_in_sign():
    """Muon's decay: w - lr * (scale * O + wd * w * [O * w > 0]) with O the orthogonalised step."""
    torch.manual_seed(3)
    w0, g = torch.randn(32, 16), torch.randn(32, 16)
    plain, decayed = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    for p, wd in ((plain, 0.0), (decayed, 0.5)):
        p.grad = g.clone()
        Muon([p], lr=0.1, momentum=0.0, weight_decay=wd).step()
    step = orthogonalize(g)
    agree = step * w0 > 0
    assert 0.2 < agree.float().mean() < 0.8  # both kinds of coordinate are tested
    want = w0 - 0.1 * 2 ** 0.5 * step - 0.1 * 0.5 * w0 * agree
    assert torch.allclose(decayed.detach(), want, atol=1e-6)
    # where they disagree the decay is off: those weights moved exactly as without it
    assert torch.equal(decayed.detach()[~agree], plain.detach()[~agree])
    assert decayed.detach().norm() < plain.detach().norm()  # and the matrix shrinks


def test_muon_momentum_warms_up_by_the_step_alone():
    from pocketgpt.config import OptimConfig
    from pocketgpt.optim import muon_momentum_at, set_muon_momentum

    cfg = OptimConfig(optimizer="muon", muon_momentum=0.95, muon_momentum_warmup=100)
    seen = [muon_momentum_at(cfg, it) for it in (0, 50, 100, 500)]
    assert seen == pytest.approx([0.85, 0.90, 0.95, 0.95])
    assert muon_momentum_at(OptimConfig(muon_momentum=0.95), 0) == 0.95  # no warmup: the setting throughout
    assert muon_momentum_at(OptimConfig(muon_momentum=0.5, muon_momentum_warmup=10), 0) == 0.5  # never above it
    model = GPT(ModelConfig(vocab_size=29, block_size=16, n_layer=2, n_head=2, n_embd=16))
    opts = make_optimizers(model, cfg, torch.device("cpu"))
    set_muon_momentum(opts, 0.9)
    assert [g["momentum"] for g in opts[1].param_groups] == [0.9]
    assert all("momentum" not in g for g in opts[0].param_groups)  # AdamW untouched


def test_muon_options_train_and_resume_exactly(data_dir, tmp_path):
    from helpers import assert_resumes_exactly

    a = assert_resumes_exactly(data_dir, tmp_path, 15, max_iters=30, lr_decay_iters=30, eval_interval=15,
                               optimizer="muon", muon_momentum_warmup=20, muon_weight_decay=0.1)
    assert a[30] < a[1] - 0.3


def test_a_bf16_run_orthogonalises_in_bf16():
    from pocketgpt.config import OptimConfig

    cfg, cpu = OptimConfig(optimizer="muon"), torch.device("cpu")
    assert make_optimizers(build(), cfg, cpu, torch.bfloat16)[1].ns_dtype == torch.bfloat16
    assert make_optimizers(build(), cfg, cpu)[1].ns_dtype == torch.float32


def test_attention_dropout_false_keeps_dropout_on_the_residual_branches_only(monkeypatch):
    import pocketgpt.model as model_module

    seen = []
    real = model_module.attend
    monkeypatch.setattr(model_module, "attend", lambda q, k, v, p: seen.append(p) or real(q, k, v, p))
    idx = torch.randint(0, 29, (2, 16))
    for flag in (True, False):
        m = build(dropout=0.2, attention_dropout=flag).train()
        seen.clear()
        a, b = m(idx)[0], m(idx)[0]
        assert seen == [0.2 if flag else 0.0] * 4  # 2 layers, 2 forwards
        assert not torch.equal(a, b)  # the residual dropout still draws a new mask each forward
    cfg = tiny_config(dropout=0.1, attention_dropout=False)
    assert cfg.model.attention_dropout is False  # a config key like any other (--attention-dropout false)


def test_qk_norm_gains_are_vectors_for_adamw_never_muon_nor_lora_and_train_under_bf16():
    from pocketgpt.config import LoraConfig, OptimConfig
    from pocketgpt.lora import add_adapters

    model = build(qk_norm=True, qk_norm_gains=True, n_kv_head=1).train()
    gains = [p for n, p in model.named_parameters() if n.endswith(("attn.q_norm.weight", "attn.k_norm.weight"))]
    assert len(gains) == 4 and all(p.shape == (8,) and bool((p == 1).all()) for p in gains)  # ones at init
    idx = torch.randint(0, 29, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 queries and keys, float32 gains
        model(idx, idx)[1].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gains)
    adamw, muon = make_optimizers(model, OptimConfig(optimizer="muon"), torch.device("cpu"))
    undecayed = {id(p) for g in adamw.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert all(id(p) in undecayed for p in gains)
    assert not {id(p) for g in muon.param_groups for p in g["params"]} & {id(p) for p in gains}
    add_adapters(model, LoraConfig(lora_rank=2, lora_targets="all"))
    assert not any("norm.lora" in n for n in model.state_dict()) and not any(p.requires_grad for p in gains)
