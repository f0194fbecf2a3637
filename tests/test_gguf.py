"""`export --format gguf` (gguf_export.py): llama.cpp's gpt2 metadata, tensors, tokenizer, and what is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
gguf = pytest.importorskip("gguf")

from helpers import run_cli, train_tiny, untrained_run  # noqa: E402

from pocketgpt import gguf_export  # noqa: E402
from pocketgpt.config import ModelConfig, PrepareConfig  # noqa: E402
from pocketgpt.corpus import prepare  # noqa: E402
from pocketgpt.errors import PocketError  # noqa: E402
from pocketgpt.loading import load  # noqa: E402
from pocketgpt.model import GPT  # noqa: E402
from pocketgpt.tokenizer import CharTokenizer, GPT2Tokenizer, byte_stand_ins, train_bpe  # noqa: E402

TEXTS = ("Hello world, this is pocketgpt talking to llama.cpp.", "  odd   spacing\n\n\tand Ünïcode 数字 123,456",
         "<|endoftext|> is plain text here")


class Gguf:
    """A GGUF file read back: metadata as Python values, tensors as numpy arrays in numpy (not ggml) order."""

    def __init__(self, path: Path):
        reader = gguf.GGUFReader(str(path))
        self.meta = {k: f.contents() for k, f in reader.fields.items()}
        self.tensors = {t.name: t for t in reader.tensors}

    def array(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return np.asarray(t.data).reshape(tuple(int(n) for n in reversed(t.shape)))


def export(capsys, run: Path, out: Path, *extra) -> tuple[int, str, str]:
    return run_cli(capsys, "export", "--model", run, "--format", "gguf", "--out", out, *extra)


def expected_names(n_layer: int, tied: bool) -> set[str]:
    names = {"token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias"}
    for i in range(n_layer):
        for t in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"):
            names |= {f"blk.{i}.{t}.weight", f"blk.{i}.{t}.bias"}
    return names if tied else names | {"output.weight"}


def assert_weights_equal(g: Gguf, model: GPT, atol: float = 0.0) -> None:
    """Every GGUF tensor is the model's own (nn.Linear layout, no transpose); missing biases are zeros."""
    cfg, state = model.config, model.state_dict()
    C = cfg.n_embd
    pairs = {"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
             "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
             "output.weight": "lm_head.weight"}
    for i in range(cfg.n_layer):
        for ours, theirs in (("ln_1", "attn_norm"), ("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"),
                             ("ln_2", "ffn_norm"), ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")):
            for kind in ("weight", "bias"):
                pairs[f"blk.{i}.{theirs}.{kind}"] = f"transformer.h.{i}.{ours}.{kind}"
    shapes = {"blk.0.attn_qkv.weight": (3 * C, C), "blk.0.ffn_up.weight": (4 * C, C),
              "blk.0.ffn_down.weight": (C, 4 * C), "token_embd.weight": (cfg.vocab_size, C),
              "position_embd.weight": (cfg.block_size, C)}
    for name, shape in shapes.items():  # numpy order; ggml's ne is the reverse, as llama.cpp's loader expects
        assert g.array(name).shape == shape and tuple(g.tensors[name].shape) == shape[::-1], name
    for name in g.tensors:
        ours = state.get(pairs[name])
        want = ours.float().numpy() if ours is not None else np.zeros(g.array(name).shape, np.float32)
        np.testing.assert_allclose(g.array(name).astype(np.float32), want, rtol=0, atol=atol, err_msg=name)


def assert_tokenizer_consistent(g: Gguf, tok) -> None:
    """Tokens are pocketgpt's pieces in its id order, and the merges rebuild its very ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokens, merges = g.meta["tokenizer.ggml.tokens"], g.meta["tokenizer.ggml.merges"]
    assert g.meta["tokenizer.ggml.model"] == "gpt2" and g.meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(tokens) == tok.vocab_size == len(g.meta["tokenizer.ggml.token_type"]) == g.array("token_embd.weight").shape[0]
    table = byte_stand_ins()
    for i in (0, 1, 100, tok.vocab_size // 2, tok.vocab_size - 2):
        if i != tok.eot_id:
            assert bytes(table[c] for c in tokens[i]) == tok.piece(i), i
    assert tokens[tok.eot_id] == "<|endoftext|>"
    assert g.meta["tokenizer.ggml.token_type"][tok.eot_id] == gguf.TokenType.CONTROL
    assert g.meta["tokenizer.ggml.bos_token_id"] == g.meta["tokenizer.ggml.eos_token_id"] == tok.eot_id
    assert g.meta["tokenizer.ggml.add_bos_token"] is False
    assert merges and all(m.count(" ") == 1 for m in merges)
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ")) for m in merges]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for s in TEXTS:
        assert bpe.encode(s, add_special_tokens=False).ids == tok.encode(s), s


def assert_hparams(g: Gguf, model: GPT, file_type: int) -> None:
    cfg = model.config
    m = g.meta
    assert m["general.architecture"] == "gpt2" and m["general.file_type"] == file_type
    assert (m["gpt2.context_length"], m["gpt2.embedding_length"], m["gpt2.block_count"],
            m["gpt2.feed_forward_length"], m["gpt2.attention.head_count"]) == (
        cfg.block_size, cfg.n_embd, cfg.n_layer, 4 * cfg.n_embd, cfg.n_head)
    assert m["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)


# ---------------------------------------------------------------- what a good export holds

@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("gpt2")
    run = untrained_run(root, GPT2Tokenizer(), bias=True, mlp="gelu_new")
    return run, root / "model.gguf", root.name


@pytest.mark.slow
def test_gpt2_run_metadata_tensors_tokenizer(capsys, gpt2_export):
    run, out, _ = gpt2_export
    code, stdout, err = export(capsys, run, out)
    assert code == 0, err
    assert "llama-cli -m" in stdout and "note:" not in stdout  # gelu_new is llama.cpp's own GELU
    g = Gguf(out)
    lm = load(run)
    assert_hparams(g, lm.model, gguf.LlamaFileType.ALL_F32)
    assert g.meta["general.name"] == "run" and g.meta["general.license"] == "other"
    assert set(g.tensors) == expected_names(2, tied=True)  # llama.cpp reuses token_embd as the tied head
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in g.tensors.values())
    assert_weights_equal(g, lm.model)
    assert_tokenizer_consistent(g, lm.tokenizer)
    assert len(g.meta["tokenizer.ggml.merges"]) == 50_000  # GPT-2's vocab.bpe


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, corpus_text) -> Path:
    """A tiny model trained on a byte-level BPE of its own: no biases, exact GELU, an untied head."""
    root = tmp_path_factory.mktemp("bpe")
    src = root / "book.txt"
    src.write_text(corpus_text[:30_000], encoding="utf-8")
    data = prepare(PrepareConfig(inputs=[str(src)], out=str(root / "data"), tokenizer="bpe", vocab_size=400))
    return train_tiny(root / "run", data, max_iters=10, eval_interval=10, tie_embeddings=False)


def test_trained_bpe_run(capsys, tmp_path, bpe_run):
    out = tmp_path / "nested" / "tiny.gguf"  # the folder is made
    code, stdout, err = export(capsys, bpe_run, out, "--license", "mit")
    assert code == 0, err
    assert "exact GELU" in stdout  # the one approximation llama.cpp's gpt2 makes, said
    g = Gguf(out)
    lm = load(bpe_run)
    assert not lm.model.config.bias and not lm.model.config.tie_embeddings
    assert_hparams(g, lm.model, gguf.LlamaFileType.ALL_F32)
    assert g.meta["general.license"] == "mit"
    assert set(g.tensors) == expected_names(lm.model.config.n_layer, tied=False)
    assert_weights_equal(g, lm.model)  # biases are zeros, the head is lm_head
    assert_tokenizer_consistent(g, lm.tokenizer)
    assert [p.name for p in out.parent.iterdir()] == ["tiny.gguf"]  # no temp file left


def test_f16_keeps_vectors_and_positions_f32(capsys, tmp_path, bpe_run):
    out = tmp_path / "half.gguf"
    code, _, err = export(capsys, bpe_run, out, "--gguf-dtype", "f16")
    assert code == 0, err
    g = Gguf(out)
    lm = load(bpe_run)
    assert_hparams(g, lm.model, gguf.LlamaFileType.MOSTLY_F16)
    F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    for name, t in g.tensors.items():
        big = len(t.shape) == 2 and name != "position_embd.weight"
        assert t.tensor_type == (F16 if big else F32), name
    assert_weights_equal(g, lm.model, atol=2e-3)  # f16 rounding of weights of size ~0.1


def test_tensor_names_come_from_gguf_constants():
    from pocketgpt.arch import gpt2

    assert gguf_export.gguf_name(gpt2.FAMILY, "transformer.h.11.mlp.c_proj.weight", 12) == "blk.11.ffn_down.weight"
    assert gguf_export.gguf_name(gpt2.FAMILY, "lm_head.weight", 12) == "output.weight"
    with pytest.raises(PocketError, match="no such tensor"):
        gguf_export.gguf_name(gpt2.FAMILY, "transformer.h.0.attn.q_norm.weight", 12)


# ---------------------------------------------------------------- refusals: one line, nothing written

def test_a_char_run_goes_with_an_added_end_token_that_never_outranks_a_character(capsys, tmp_path, data_dir):
    """llama.cpp's BPE vocabulary needs an end-of-text token: one more token and row, the mean of the others,
    so its logit is the mean of the characters' and never the top one; every character its own token."""
    run = train_tiny(tmp_path / "char", data_dir, max_iters=2, eval_interval=2)
    out = tmp_path / "char.gguf"
    code, _, err = export(capsys, run, out)
    assert code == 0, err
    g, lm = Gguf(out), load(run)
    chars, V = lm.tokenizer.chars, lm.model.config.vocab_size
    tokens = g.meta["tokenizer.ggml.tokens"]
    assert len(tokens) == V + 1 and tokens[V] == "<|endoftext|>"
    assert [bytes(byte_stand_ins()[c] for c in t).decode("utf-8") for t in tokens[:V]] == chars
    assert g.meta["tokenizer.ggml.eos_token_id"] == V and g.meta["tokenizer.ggml.token_type"][V] == 3
    head = g.array("token_embd.weight")  # tied: llama.cpp's head too
    ours = lm.model.lm_head.weight.detach().numpy()
    assert head.shape == (V + 1, ours.shape[1]) and np.array_equal(head[:V], ours)
    assert np.allclose(head[V], ours.mean(axis=0), atol=1e-7)
    # the end token's logit is the characters' mean: below their largest wherever they differ
    seen = []
    lm.model.transformer.ln_f.register_forward_hook(lambda m, i, o: seen.append(o[0].detach().numpy()))
    logits = lm.logits(lm.tokenizer.encode("ROMEO:\nWhat")).numpy()
    theirs = seen[0] @ head.T  # the same final hidden states through the GGUF's head
    assert np.allclose(theirs[:, :V], logits, atol=1e-5)
    assert (theirs[:, V] < theirs[:, :V].max(axis=1)).all()


@pytest.mark.parametrize("option, name", [({"pos_emb": "rope"}, "rope"), ({"norm": "rmsnorm"}, "rmsnorm"),
                                          ({"qk_norm": True}, "qk_norm"), ({"mlp": "relu2"}, "relu2")])
def test_options_gpt2_cannot_express_are_refused(capsys, tmp_path, option, name):
    run = untrained_run(tmp_path, GPT2Tokenizer(), **option)
    out = tmp_path / "m.gguf"
    code, _, err = export(capsys, run, out)
    assert code == 2 and err.count("\n") == 1 and name in err and "GGUF" in err
    assert not out.exists()


@pytest.mark.slow
def test_overwrite_folder_and_a_failed_write_lose_nothing(capsys, tmp_path, monkeypatch, gpt2_export):
    run = gpt2_export[0]
    out = tmp_path / "m.gguf"
    out.write_bytes(b"an earlier export")
    code, _, err = export(capsys, run, out)
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1
    assert out.read_bytes() == b"an earlier export"

    def broken(self, *a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
        code, _, err = export(capsys, run, out, "--overwrite")
    assert code == 2 and err.count("\n") == 1 and "no space left on device" in err and "m.gguf" in err
    assert out.read_bytes() == b"an earlier export" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]

    code, _, err = export(capsys, run, out, "--overwrite")
    assert code == 0, err
    assert Gguf(out).meta["general.architecture"] == "gpt2"

    code, _, err = export(capsys, run, tmp_path)  # a folder, not a file
    assert code == 2 and "is a folder" in err


def test_gguf_dtype_is_for_gguf_only(capsys, tmp_path, gpt2_export):
    code, _, err = run_cli(capsys, "export", "--model", gpt2_export[0], "--out", tmp_path / "hf", "--gguf-dtype", "f16")
    assert code == 2 and "--format gguf" in err
    assert not (tmp_path / "hf").exists()
    with pytest.raises(PocketError, match="gguf-dtype"):
        gguf_export.export_gguf(load(gpt2_export[0]).model, GPT2Tokenizer(), tmp_path / "x.gguf", dtype="q4")


def test_api_refuses_a_too_small_model(tmp_path):
    model = GPT(ModelConfig(vocab_size=3, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(PocketError, match="do not belong together"):
        gguf_export.export_gguf(model, GPT2Tokenizer(), tmp_path / "g.gguf")
    assert not list(tmp_path.iterdir())


def test_model_rows_beyond_the_tokenizer_get_unused_tokens(tmp_path, corpus_text):
    tok = train_bpe([corpus_text[:5_000]], 280)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size + 3, block_size=8, n_layer=1, n_head=1, n_embd=8))
    gguf_export.export_gguf(model, tok, tmp_path / "padded.gguf")
    g = Gguf(tmp_path / "padded.gguf")
    tokens, types = g.meta["tokenizer.ggml.tokens"], g.meta["tokenizer.ggml.token_type"]
    assert len(tokens) == model.config.vocab_size == g.array("token_embd.weight").shape[0]
    assert tokens[-1] == f"[PAD{model.config.vocab_size - 1}]" and types[-3:] == [gguf.TokenType.UNUSED] * 3
