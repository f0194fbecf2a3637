"""Architecture families (arch/): the rename table both ways, dispatch on config.json, and which family fits."""

import pytest
import torch

from pocketgpt import arch
from pocketgpt.arch import GATE_UP, QKV, SAME, Family, Rename, gpt2, llama
from pocketgpt.arch.convert import from_theirs, to_theirs
from pocketgpt.config import ModelConfig
from pocketgpt.errors import PocketError
from pocketgpt.model import GPT


def tiny(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=19, block_size=8, n_layer=2, n_head=2, n_embd=8, **kw)


def random_state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.state_dict()


@pytest.mark.parametrize("opts", [{}, {"bias": True}, {"tie_embeddings": False}, {"qkv_bias": True},
                                  {"bias": True, "mlp": "gelu_new", "tie_embeddings": False}])
def test_gpt2_table_round_trips_and_pads_what_a_run_lacks_with_zeros(opts):
    cfg = tiny(**opts)
    state = random_state(cfg)
    theirs = to_theirs(state, gpt2.FAMILY, cfg)
    # GPT-2 keeps every bias; Conv1D stores W as (in, out)
    assert theirs["transformer.h.1.mlp.c_fc.bias"].shape == (32,)
    assert torch.equal(theirs["transformer.h.0.attn.c_attn.weight"], state["transformer.h.0.attn.c_attn.weight"].t())
    assert ("lm_head.weight" in theirs) == (not cfg.tie_embeddings)
    if not cfg.bias:
        assert not theirs["transformer.ln_f.bias"].any()
    back = from_theirs(dict(theirs), gpt2.FAMILY, cfg, "here")
    expected = {k: v for k, v in state.items() if not (k == "lm_head.weight" and cfg.tie_embeddings)}
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)


def test_import_refuses_a_missing_an_unexpected_and_a_nonzero_tensor():
    cfg = tiny()
    theirs = to_theirs(random_state(cfg), gpt2.FAMILY, cfg)
    with pytest.raises(PocketError, match=r"missing \['transformer.wpe.weight'\]"):
        from_theirs({k: v for k, v in theirs.items() if k != "transformer.wpe.weight"}, gpt2.FAMILY, cfg, "here")
    with pytest.raises(PocketError, match="unexpected.*extra"):
        from_theirs({**theirs, "extra": torch.zeros(1)}, gpt2.FAMILY, cfg, "here")
    bad = dict(theirs)
    bad["transformer.h.0.ln_1.bias"] = torch.ones(8)  # a bias this bias-free config cannot hold
    with pytest.raises(PocketError, match="ln_1.bias is not zero"):
        from_theirs(bad, gpt2.FAMILY, cfg, "here")


def test_unit_gain_qk_norm_goes_to_qwen3_as_gains_of_ones_and_comes_back_only_from_ones():
    cfg = tiny(pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True)
    state = random_state(cfg)
    theirs = to_theirs(state, llama.QWEN3, cfg)
    assert torch.equal(theirs["model.layers.1.self_attn.k_norm.weight"], torch.ones(cfg.head_dim))
    back = from_theirs(dict(theirs), llama.QWEN3, cfg, "here")
    assert set(back) == set(state) - {"lm_head.weight"} and all(torch.equal(back[k], state[k]) for k in back)
    learned = dict(theirs, **{"model.layers.1.self_attn.k_norm.weight": torch.full((cfg.head_dim,), 2.0)})
    with pytest.raises(PocketError, match="k_norm.weight is not all 1, and this config has no such tensor"):
        from_theirs(learned, llama.QWEN3, cfg, "here")


def _split_family() -> Family:
    """A family that stores q, k, v and the gated MLP's halves as matrices of their own (Llama's way)."""
    def renames(cfg: ModelConfig) -> list[Rename]:
        table = [Rename("transformer.wte.weight", ("embed",)), Rename("transformer.ln_f.weight", ("norm",))]
        for i in range(cfg.n_layer):
            b = f"transformer.h.{i}."
            table += [Rename(b + "ln_1.weight", (f"l{i}.in_norm",)), Rename(b + "ln_2.weight", (f"l{i}.post_norm",)),
                      Rename(b + "attn.c_attn.weight", (f"l{i}.q", f"l{i}.k", f"l{i}.v"), QKV),
                      Rename(b + "attn.c_proj.weight", (f"l{i}.o",)),
                      Rename(b + "mlp.c_fc.weight", (f"l{i}.gate", f"l{i}.up"), GATE_UP),
                      Rename(b + "mlp.c_proj.weight", (f"l{i}.down",), SAME)]
        return table + ([] if cfg.tie_embeddings else [Rename("lm_head.weight", ("lm_head.weight",))])

    return Family(name="split", title="Split", hf_model_types=("split",), hf_architectures=("SplitForCausalLM",),
                  renames=renames, config_from_hf=lambda raw, where: tiny(), config_to_hf=lambda cfg, eot: {},
                  cannot=lambda cfg: [] if cfg.mlp == "swiglu" else [f'mlp = "{cfg.mlp}" (Split is gated)'])


def test_rows_split_on_export_and_join_on_import():
    cfg = tiny(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, mlp_width=12)
    state = random_state(cfg)
    fam = _split_family()
    theirs = to_theirs(state, fam, cfg)
    q, k, v = (theirs[f"l0.{n}"] for n in "qkv")
    assert q.shape == (8, 8) and k.shape == v.shape == (4, 8)  # one key/value head of 4 beside two query heads
    assert torch.equal(torch.cat([q, k, v]), state["transformer.h.0.attn.c_attn.weight"])
    assert torch.equal(theirs["l1.gate"], state["transformer.h.1.mlp.c_fc.weight"][:12])
    assert torch.equal(theirs["l1.up"], state["transformer.h.1.mlp.c_fc.weight"][12:])
    back = from_theirs(dict(theirs), fam, cfg, "here")
    assert all(torch.equal(back[k], state[k]) for k in back) and set(back) == set(state) - {"lm_head.weight"}


def test_a_rename_says_how_many_names_it_needs():
    with pytest.raises(ValueError, match="qkv rename needs 3"):
        Rename("a", ("q", "k"), QKV)
    with pytest.raises(ValueError, match="width of the vector written for it"):
        Rename(None, ("bias",))


def test_dispatch_is_on_model_type_and_names_what_pocketgpt_reads():
    assert arch.for_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "x") is gpt2.FAMILY
    assert arch.for_hf({"architectures": ["GPT2LMHeadModel"]}, "x") is gpt2.FAMILY  # an old config without model_type
    with pytest.raises(PocketError, match="'mamba' model.*pocketgpt reads gpt2"):
        arch.for_hf({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}, "x")


def test_fitting_picks_the_first_family_that_can_express_a_run_or_says_why_each_cannot(monkeypatch):
    assert arch.fitting(tiny()) is gpt2.FAMILY
    modern = tiny(pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="relu2")
    with pytest.raises(PocketError) as e:
        arch.fitting(modern)
    message = str(e.value)  # every family, each with every reason, on one line
    assert message.startswith("cannot export to Hugging Face: no architecture family can hold this model (")
    assert all(word in message for word in ("GPT-2", "Llama", "rope", "rmsnorm", "qk_norm", "relu2"))
    assert "\n" not in message
    split = _split_family()
    monkeypatch.setattr(arch, "families", lambda: {"gpt2": gpt2.FAMILY, "split": split})
    assert arch.fitting(tiny(mlp="swiglu")) is split  # GPT-2 cannot hold a gated MLP, the next family can
    with pytest.raises(PocketError, match=r"no architecture family can hold this model \(Hugging Face GPT-2: .*relu2"
                                          r".*\| Hugging Face Split: mlp = \"relu2\""):
        arch.fitting(modern)
    monkeypatch.setattr(arch, "families", lambda: {"gpt2": gpt2.FAMILY})  # one family: its reasons alone
    with pytest.raises(PocketError, match=r"^cannot export to Hugging Face GPT-2: this model uses pos_emb"):
        arch.fitting(modern)
    with pytest.raises(PocketError, match=r"GGUF \(llama.cpp's gpt2\)"):
        arch.fitting(modern, gguf=True)


@pytest.mark.parametrize("opts, word", [({"n_kv_head": 1}, "n_kv_head"), ({"head_size": 8}, "head_size"),
                                        ({"mlp_width": 24}, "mlp_width"), ({"norm_eps": 1e-6}, "norm_eps"),
                                        ({"mlp": "swiglu"}, "swiglu")])
def test_gpt2_refuses_each_new_option_by_name(opts, word):
    problems = gpt2.cannot(tiny(**opts))
    assert len(problems) == 1 and word in problems[0]
    assert gpt2.cannot(tiny(norm_eps=1e-5, qkv_bias=True)) == []  # GPT-2's own epsilon; other biases zero


def test_every_presets_model_exports_to_transformers_and_gguf():
    from pocketgpt.config import build_train_config, list_presets

    for name in list_presets():
        m = build_train_config(preset=name).model  # fine-tune presets keep their base's shape: the defaults here
        assert arch.fitting(m) is not None and arch.fitting(m, gguf=True) is not None, name
