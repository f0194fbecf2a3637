"""Hugging Face and nanoGPT interop (hf.py): import, the hub cache, export, and what is refused."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import hf_logits, max_diff, run_cli, untrained_run  # noqa: E402

from pocketgpt import hf  # noqa: E402
from pocketgpt.arch import gpt2  # noqa: E402
from pocketgpt.nanogpt import NANOGPT_PADDED_VOCAB  # noqa: E402

# the matrices Hugging Face's GPT-2 stores as Conv1D (in, out), transposed from nanoGPT's nn.Linear
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
from pocketgpt.errors import PocketError  # noqa: E402
from pocketgpt.loading import load  # noqa: E402
from pocketgpt.tokenizer import CharTokenizer, GPT2Tokenizer, train_bpe  # noqa: E402

TOL = 1e-4
TEXT = "Hello world, this is pocketgpt talking to GPT-2. Ünïcode too!"
SMALL = dict(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=50257)


def hf_model(seed: int = 0, **overrides) -> "transformers.GPT2LMHeadModel":
    """A tiny random GPT-2, float32 eager attention; LayerNorms and biases randomised so mistakes there show."""
    torch.manual_seed(seed)
    if overrides.get("vocab_size", 50257) < 50257:  # GPT-2's end-of-text id would lie outside the vocabulary
        overrides = {"bos_token_id": None, "eos_token_id": None, **overrides}
    cfg = transformers.GPT2Config(**{**SMALL, **overrides}, attn_implementation="eager")
    m = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    hf_model().save_pretrained(str(d))
    return d


# ---------------------------------------------------------------- Hugging Face -> pocketgpt

@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_hf_folder_logits_equal(tmp_path, activation):
    d = tmp_path / "m"
    hf_model(activation_function=activation).save_pretrained(str(d))
    lm = load(d)
    assert lm.info["source_kind"] == "huggingface" and lm.model.config.mlp == gpt2.ACTIVATIONS[activation]
    ids = lm.tokenizer.encode(TEXT)
    assert max_diff(lm.logits(ids), hf_logits(d, ids)) < TOL


def test_pytorch_model_bin_with_old_buffers_and_no_prefix(tmp_path, hf_folder):
    """An old save: pytorch_model.bin (read with weights_only), GPT2Model keys, attn.bias / masked_bias buffers."""
    m = hf_model()
    state = {k.removeprefix("transformer."): v for k, v in m.state_dict().items() if k != "lm_head.weight"}
    for i in range(SMALL["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    d = tmp_path / "old"
    d.mkdir()
    torch.save(state, d / "pytorch_model.bin")
    (d / "config.json").write_text((hf_folder / "config.json").read_text())
    lm = load(d)
    ids = lm.tokenizer.encode(TEXT)
    assert max_diff(lm.logits(ids), hf_logits(hf_folder, ids)) < TOL


class _Boom:
    def __reduce__(self):
        return (os.mkdir, ("/tmp/pocketgpt-should-never-exist",))


def test_pickle_with_code_is_refused(tmp_path, hf_folder):
    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text((hf_folder / "config.json").read_text())
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"wte.weight": _Boom()}, f, protocol=2)
    with pytest.raises(PocketError, match="refusing to load"):
        load(d)
    assert not Path("/tmp/pocketgpt-should-never-exist").exists()


def test_unsupported_hf_models_are_refused(tmp_path, hf_folder):
    d = tmp_path / "other"
    d.mkdir()
    raw = json.loads((hf_folder / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**raw, "model_type": "mamba"}))
    with pytest.raises(PocketError, match="'mamba' model.*pocketgpt reads gpt2, llama, qwen2"):
        load(d)
    (d / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))  # a Llama without its keys
    with pytest.raises(PocketError, match="config.json lacks hidden_size"):
        load(d)
    (d / "config.json").write_text(json.dumps({**raw, "scale_attn_by_inverse_layer_idx": True}))
    with pytest.raises(PocketError, match="scale_attn_by_inverse_layer_idx"):
        load(d)
    (d / "config.json").write_text(json.dumps({**raw, "vocab_size": 1000}))
    with pytest.raises(PocketError, match="has no tokenizer.json; pocketgpt reads a pretrained model's tokenizer"):
        load(d)  # not GPT-2's vocabulary, and no tokenizer of its own


def _fake_hub_cache(root: Path, repo: str, src: Path) -> None:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/files}."""
    base = root / ("models--" + repo.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)


def test_hub_name_from_the_cache_offline(tmp_path, monkeypatch, hf_folder):
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "someone/tiny-gpt2", hf_folder)
    _fake_hub_cache(cache, "openai-community/gpt2", hf_folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so no local folder of that name can be found instead
    lm = load("someone/tiny-gpt2")
    assert lm.info["hub_name"] == "someone/tiny-gpt2" and lm.model.config.n_layer == 2
    ids = lm.tokenizer.encode(TEXT)
    assert max_diff(lm.logits(ids), hf_logits(hf_folder, ids)) < TOL
    assert load("gpt2").model.config.n_embd == 32  # the short name finds openai-community/gpt2
    with pytest.raises(PocketError, match="not in the Hugging Face cache"):
        load("someone/missing")


# ---------------------------------------------------------------- the CLI on an imported model

def test_sample_info_eval_on_hf_folder(capsys, tmp_path, hf_folder):
    code, out, err = run_cli(capsys, "sample", "--model", hf_folder, "--prompt", "Hello", "--max-new-tokens", 5,
                             "--seed", 1)
    assert code == 0 and out.startswith("Hello") and len(out) > len("Hello\n"), err
    code, out, err = run_cli(capsys, "info", "--model", hf_folder)
    assert code == 0 and "huggingface" in out and "gpt2 tokenizer" in out, err
    code, out, err = run_cli(capsys, "eval", "--model", hf_folder)
    assert code == 2 and "--file" in err and "--data" in err
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 3)
    code, out, err = run_cli(capsys, "eval", "--model", hf_folder, "--file", text, "--json")
    assert code == 0 and json.loads(out)["loss"] > 0, err


# ---------------------------------------------------------------- nanoGPT -> pocketgpt

def _nanogpt_dir(tmp_path: Path, m: "transformers.GPT2LMHeadModel", vocab: int, bias: bool = True,
                 compiled: bool = True) -> Path:
    """ckpt.pt as nanoGPT's train.py writes it, from a GPT-2's weights turned into nn.Linear layout."""
    state = {}
    for k, v in m.state_dict().items():
        if k.endswith(CONV1D):
            v = v.t().contiguous()
        if not bias and k.endswith(".bias"):
            continue
        state[("_orig_mod." if compiled else "") + k] = v
    state[("_orig_mod." if compiled else "") + "transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    c = m.config
    args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions, bias=bias,
                vocab_size=vocab, dropout=0.0)
    d = tmp_path / "out-nano"
    d.mkdir()
    torch.save({"model": state, "model_args": args, "config": {"dataset": "shakespeare_char"}, "iter_num": 5000,
                "best_val_loss": torch.tensor(1.47)}, d / "ckpt.pt")
    return d


def test_nanogpt_char_checkpoint(tmp_path):
    chars = sorted(set("\n !',.:?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))
    m = hf_model(vocab_size=len(chars), activation_function="gelu")  # nanoGPT's GELU is the exact one
    d = _nanogpt_dir(tmp_path, m, len(chars))
    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    for src in (d, d / "ckpt.pt"):
        lm = load(src)
        assert lm.info["source_kind"] == "nanogpt" and lm.tokenizer.kind == "char"
        ids = lm.tokenizer.encode("ROMEO: Hello, world!")
        assert ids == [chars.index(c) for c in "ROMEO: Hello, world!"]
        with torch.no_grad():
            ref = m(torch.tensor([ids])).logits[0]
        assert max_diff(lm.logits(ids), ref) < TOL
    assert lm.info["iter"] == "5000"


def test_nanogpt_char_vocab_given_or_rebuilt_from_the_text(tmp_path, capsys):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    chars = sorted(set(text))  # nanoGPT's char prepare.py numbering
    m = hf_model(vocab_size=len(chars), activation_function="gelu")
    d = _nanogpt_dir(tmp_path, m, len(chars))  # no meta.pkl beside ckpt.pt
    code, _, err = run_cli(capsys, "info", "--model", d)
    assert code == 2 and "--vocab" in err and "input.txt" in err
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    elsewhere = tmp_path / "data"
    elsewhere.mkdir()
    with open(elsewhere / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}, f)
    for vocab in (tmp_path / "input.txt", elsewhere / "meta.pkl"):
        lm = load(d, vocab=vocab)
        ids = lm.tokenizer.encode("hear me")
        assert ids == [chars.index(c) for c in "hear me"]
        with torch.no_grad():
            assert max_diff(lm.logits(ids), m(torch.tensor([ids])).logits[0]) < TOL
        code, out, err = run_cli(capsys, "sample", "--model", d, "--vocab", vocab, "--max-new-tokens", "5",
                                 "--prompt", "hear", "--seed", "1")
        assert code == 0, err
    (tmp_path / "other.txt").write_text("only a few letters", encoding="utf-8")
    code, _, err = run_cli(capsys, "info", "--model", d, "--vocab", tmp_path / "other.txt")
    assert code == 2 and f"has {len(chars)} tokens" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "info", "--model", d, "--vocab", tmp_path / "missing.txt")
    assert code == 2 and "no file" in err


def test_finetune_from_a_nanogpt_char_checkpoint_with_vocab(tmp_path, capsys, corpus_text):
    """train --init-from CKPT --vocab input.txt: the text is numbered as nanoGPT's prepare.py numbered it."""
    text = corpus_text[:20_000]
    chars = sorted(set(text))
    m = hf_model(vocab_size=len(chars), activation_function="gelu", n_positions=32)
    d = _nanogpt_dir(tmp_path, m, len(chars))  # no meta.pkl beside ckpt.pt
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    book = tmp_path / "book.txt"
    book.write_text(text[5_000:15_000], encoding="utf-8")
    flags = ["--max-iters=1", "--eval-interval=1", "--eval-iters=1", "--batch-size=4", "--plots=false",
             "--sample-tokens=0", "--eval-sample-tokens=0", "--dtype=float32"]
    out = tmp_path / "ft"
    code, _, err = run_cli(capsys, "train", book, "--init-from", d, "--out", out, *flags)
    assert code == 2 and "--vocab" in err and not out.exists()
    code, _, err = run_cli(capsys, "train", book, "--init-from", d, "--vocab", tmp_path / "input.txt", "--out", out,
                           *flags)
    assert code == 0, err
    lm = load(out)
    assert lm.tokenizer.kind == "char" and lm.tokenizer.encode("hear me") == [chars.index(c) for c in "hear me"]
    code, _, err = run_cli(capsys, "train", book, "--vocab", tmp_path / "input.txt", "--out", tmp_path / "x", *flags)
    assert code == 2 and "--init-from" in err and not (tmp_path / "x").exists()


def test_nanogpt_without_bias_and_padded_gpt2_vocab(tmp_path):
    m = hf_model(vocab_size=NANOGPT_PADDED_VOCAB, activation_function="gelu")
    d = _nanogpt_dir(tmp_path, m, NANOGPT_PADDED_VOCAB, bias=False, compiled=False)
    lm = load(d)  # no meta.pkl and GPT-2's (padded) vocabulary: GPT-2's tokenizer, as nanoGPT's sample.py
    assert lm.tokenizer.kind == "gpt2" and lm.model.config.vocab_size == 50257 and not lm.model.config.bias
    assert lm.generate("Hi", max_new_tokens=4, seed=0).startswith("Hi")


def test_nanogpt_meta_pkl_with_code_is_refused(tmp_path):
    m = hf_model(vocab_size=10, activation_function="gelu")
    d = _nanogpt_dir(tmp_path, m, 10)
    target = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(target),))

    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 10, "stoi": Evil()}, f)
    with pytest.raises(PocketError, match="refusing to read .*meta.pkl.*posix.mkdir|refusing to read .*os.mkdir"):
        load(d)
    assert not target.exists()
    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 10, "stoi": {"a": 0.5}}, f)  # a float: plain, but not what meta.pkl holds
    with pytest.raises(PocketError, match="only a dict of strings and ints"):
        load(d)
    (d / "meta.pkl").unlink()
    with pytest.raises(PocketError, match="no meta.pkl.*give --vocab"):
        load(d)


# ---------------------------------------------------------------- pocketgpt -> Hugging Face

def _export(capsys, run: Path, out: Path, *extra) -> tuple[int, str, str]:
    return run_cli(capsys, "export", "--model", run, "--format", "hf", "--out", out, *extra)


def test_export_gpt2_run_round_trips(capsys, tmp_path):
    run = untrained_run(tmp_path, GPT2Tokenizer(), bias=True, mlp="gelu_new")
    out = tmp_path / "export"
    code, stdout, err = _export(capsys, run, out)
    assert code == 0, err
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "vocab.json",
            "merges.txt"} <= {p.name for p in out.iterdir()}
    ours = load(run)
    ids = ours.tokenizer.encode(TEXT)
    assert max_diff(ours.logits(ids), hf_logits(out, ids)) < TOL
    assert max_diff(ours.logits(ids), load(out).logits(ids)) < TOL  # and back into pocketgpt
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for s in (TEXT, "  spaces\n\nand\ttabs  ", "<|endoftext|> is text here", "数字 123,456"):
        assert tok(s)["input_ids"] == ours.tokenizer.encode(s), s
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: other") and "pipeline_tag: text-generation" in card
    code, _, err = _export(capsys, run, out)
    assert code == 2 and "--overwrite" in err
    code, _, err = _export(capsys, run, out, "--overwrite")
    assert code == 0, err


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_export_no_bias_exact_gelu_untied(capsys, tmp_path, tokenizer, corpus_text):
    tok = (CharTokenizer.from_text(corpus_text) if tokenizer == "char"
           else train_bpe([corpus_text[:20_000]], 300))
    run = untrained_run(tmp_path, tok, bias=False, mlp="gelu", tie_embeddings=False)
    out = tmp_path / "export"
    code, stdout, err = _export(capsys, run, out)
    assert code == 0, err
    assert "not exported" not in stdout
    ours = load(run)
    ids = ours.tokenizer.encode(corpus_text[:30])
    assert max_diff(ours.logits(ids), hf_logits(out, ids)) < TOL
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    odd = "odd   spacing\n\n\tand Ünïcode" if tokenizer == "bpe" else "odd   spacing\n\nand  more!\n"
    for s in (corpus_text[:200], odd):
        assert hf_tok(s)["input_ids"] == ours.tokenizer.encode(s)
        assert hf_tok.decode(hf_tok(s)["input_ids"]) == s
    if tokenizer == "char":  # a character the model never saw is refused, not mapped to some id
        with pytest.raises(Exception):
            hf_tok("\u2603")["input_ids"]


def test_export_on_a_full_disk_is_one_line(capsys, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    run = untrained_run(tmp_path, CharTokenizer("abc"))
    out = tmp_path / "export"

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, _, err = _export(capsys, run, out)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: could not write {out / 'model.safetensors'}: no space left on device (")
    assert err.endswith(" free); model.safetensors was not written: free some space and try again\n")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp file left


@pytest.mark.parametrize("option, name", [({"pos_emb": "rope"}, "rope"), ({"norm": "rmsnorm"}, "rmsnorm"),
                                          ({"qk_norm": True}, "qk_norm"), ({"mlp": "relu2"}, "relu2")])
def test_export_refuses_what_gpt2_cannot_express(capsys, tmp_path, option, name):
    run = untrained_run(tmp_path, CharTokenizer("abc"), **option)
    out = tmp_path / "export"
    code, _, err = _export(capsys, run, out)
    assert code == 2 and name in err and err.count("\n") == 1
    assert not out.exists()
