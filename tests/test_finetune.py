"""Fine-tuning (`train --init-from SRC`): the base's weights, shape and tokenizer; crop; refusals; resume; report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import TINY, metrics, run_cli  # noqa: E402

from pocketgpt import launch as launching  # noqa: E402
from pocketgpt import rundir  # noqa: E402
from pocketgpt.config import PrepareConfig  # noqa: E402
from pocketgpt.corpus import prepare  # noqa: E402
from pocketgpt.data import open_tokens, open_training_data  # noqa: E402
from pocketgpt.errors import PocketError  # noqa: E402
from pocketgpt.loading import load  # noqa: E402
from pocketgpt.trainer import train  # noqa: E402

BASE = dict(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=50257)
# the run keys of helpers.TINY, without its shape (that comes from the base model)
RUN = {k: v for k, v in TINY.items() if k not in ("n_layer", "n_head", "n_embd", "block_size", "dropout")}
QUIET = dict(echo=lambda s: None)


def tiny_gpt2(folder: Path) -> Path:
    """A tiny random Hugging Face GPT-2 (BASE) saved to folder; also test_lora's base."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**BASE, attn_implementation="eager")
    m = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # LayerNorms and biases randomised, so the base's loss differs from a fresh model's
        for name, p in m.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.normal_(0.0, 0.5)
    m.eval().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> Path:
    return tiny_gpt2(tmp_path_factory.mktemp("hf") / "tiny-gpt2")


@pytest.fixture(scope="module")
def book(tmp_path_factory, corpus_text) -> Path:
    p = tmp_path_factory.mktemp("book") / "my-book.txt"
    p.write_text(corpus_text[:12_000], encoding="utf-8")
    return p


def request(book: Path, src: Path | str, out: Path, **overrides) -> launching.TrainRequest:
    return launching.TrainRequest(inputs=[str(book)], out=str(out), init_from=str(src),
                                  overrides={**RUN, **overrides})


def eval_loss(model, data_dir: Path, block: int, split: str = "val") -> float:
    """The trainer's own eval estimate (the same fixed batches) for a model."""
    data = open_training_data(data_dir, block, RUN["batch_size"], RUN["seed"])
    model.eval()
    with torch.no_grad():
        losses = [float(model(*(torch.from_numpy(a) for a in data.eval_samplers[split].batch(k)))[1])
                  for k in range(RUN["eval_iters"])]
    return float(np.mean(losses))


@pytest.mark.slow
def test_finetune_from_a_hugging_face_folder_starts_from_its_weights(gpt2_folder, book, tmp_path):
    out = tmp_path / "book-gpt2"
    said: list[str] = []
    done = launching.launch(request(book, gpt2_folder, out, max_iters=2, eval_interval=1, learning_rate=1e-9,
                                    min_lr=0, warmup_iters=0), echo=said.append)
    cfg, raw = rundir.read_config(out)
    assert raw["init_from"] == {"source": str(gpt2_folder), "kind": "huggingface"}
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size, cfg.model.vocab_size) == (2, 32, 64, 50257)
    assert cfg.model.bias and cfg.model.mlp == "gelu_new" and cfg.model.dropout == 0.1  # the finetune preset's
    assert cfg.optim.optimizer == "adamw" and cfg.run.early_stop_patience > 0
    assert json.loads((done.data_dir / "meta.json").read_text())["tokenizer"] == "gpt2"
    first = [m["val_loss"] for m in metrics(out) if "val_loss" in m][0]
    assert first == pytest.approx(eval_loss(load(gpt2_folder).model, done.data_dir, 64), abs=1e-3)
    assert any(line.startswith("fine-tuning ") for line in said)
    assert f"Fine-tuned from:** `{gpt2_folder}` (huggingface)" in (out / "report.md").read_text()


def test_finetune_cli_info_and_block_size_crop(gpt2_folder, book, tmp_path, capsys):
    out = tmp_path / "cropped"
    code, text, _ = run_cli(capsys, "train", book, "--init-from", gpt2_folder, "--out", out, "--block-size", "32",
                            *[f"--{k}={v}" for k, v in {**RUN, "max_iters": 3, "eval_interval": 3}.items()])
    assert code == 0 and "crops the base model's context of 64" in text
    lm = load(out)
    base = load(gpt2_folder).model
    assert lm.block_size == 32
    assert tuple(lm.model.transformer.wpe.weight.shape) == (32, 32)
    assert (lm.model.transformer.wpe.weight - base.transformer.wpe.weight[:32]).abs().max() < 1e-2  # 3 small steps
    code, text, _ = run_cli(capsys, "info", "--model", out)
    assert code == 0 and f"fine-tuned from {gpt2_folder} (huggingface)" in text
    code, text, _ = run_cli(capsys, "info", "--model", out, "--json")
    assert json.loads(text)["init_from"]["kind"] == "huggingface"


def test_contradicting_shape_and_longer_context_are_refused(gpt2_folder, book, tmp_path):
    with pytest.raises(PocketError, match="--n-layer 4 contradicts the base model, whose n_layer is 2"):
        launching.launch(request(book, gpt2_folder, tmp_path / "a", n_layer=4), **QUIET)
    with pytest.raises(PocketError, match="--block-size 128 is longer than the base model's context"):
        launching.launch(request(book, gpt2_folder, tmp_path / "b", block_size=128), **QUIET)
    with pytest.raises(PocketError, match="drop --preset auto"):
        launching.launch(launching.TrainRequest(inputs=[str(book)], out=str(tmp_path / "c"), preset="auto",
                                                init_from=str(gpt2_folder)), **QUIET)
    with pytest.raises(PocketError, match="drop --init-from"):
        launching.launch(launching.TrainRequest(out=str(tmp_path / "d"), resume=True, init_from=str(gpt2_folder)))
    with pytest.raises(PocketError, match="--init-from nowhere/at/all"):
        launching.launch(request(book, "nowhere/at/all", tmp_path / "e"), **QUIET)
    for name in "abcde":
        assert not rundir.is_run_dir(tmp_path / name)
    # agreeing shape keys are fine
    cfg = launching.finetune_config(request(book, gpt2_folder, tmp_path / "f", n_layer=2, n_embd=32), RUN | {
        "n_layer": 2, "n_embd": 32}, load(gpt2_folder).model.config, print)
    assert (cfg.model.n_layer, cfg.model.n_head) == (2, 2)


def test_data_with_another_tokenizer_is_refused(gpt2_folder, book, tmp_path):
    char_data = prepare(PrepareConfig(inputs=[str(book)], out=str(tmp_path / "char-data")))
    req = launching.TrainRequest(data=str(char_data), out=str(tmp_path / "run"), init_from=str(gpt2_folder),
                                 overrides=RUN)
    with pytest.raises(PocketError, match="prepared with a char tokenizer of .* not the base model's own \\(gpt2"):
        launching.launch(req, **QUIET)
    gpt2_data = prepare(PrepareConfig(inputs=[str(book)], out=str(tmp_path / "gpt2-data"), tokenizer="gpt2"))
    req.data, req.overrides = str(gpt2_data), {**RUN, "max_iters": 1, "eval_interval": 1}
    assert launching.launch(req, **QUIET).result.iters == 1  # a gpt2 data folder fits


def test_finetune_from_a_char_run_uses_its_vocabulary(data_dir, tmp_path, corpus_text):
    base = tmp_path / "base"
    train(launching.build_train_config(None, None, {**TINY, "max_iters": 20}), data_dir, base, **QUIET)
    small = tmp_path / "small.txt"
    small.write_text(corpus_text[30_000:36_000], encoding="utf-8")  # fewer distinct characters than the base's
    out = tmp_path / "ft"
    done = launching.launch(request(small, base, out, max_iters=2, eval_interval=1, learning_rate=1e-9, min_lr=0,
                                    warmup_iters=0), **QUIET)
    base_lm, lm = load(base), load(out)
    assert lm.tokenizer.to_dict() == base_lm.tokenizer.to_dict()
    assert lm.model.config.vocab_size == base_lm.model.config.vocab_size
    assert rundir.read_config(out)[1]["init_from"] == {"source": str(base), "kind": "pocketgpt"}
    first = [m["val_loss"] for m in metrics(out) if "val_loss" in m][0]
    assert first == pytest.approx(eval_loss(base_lm.model, done.data_dir, TINY["block_size"]), abs=1e-3)
    odd = tmp_path / "odd.txt"
    odd.write_text(corpus_text[:3000] + " ☃ snow", encoding="utf-8")
    with pytest.raises(PocketError, match="U\\+2603 SNOWMAN.*base model's .*-character vocabulary lacks"):
        launching.launch(request(odd, base, tmp_path / "odd"), **QUIET)


def test_finetune_from_a_trained_bpe_run_encodes_with_its_tokenizer(tmp_path, corpus_text, capsys):
    """A base run's trained BPE is the fine-tune's: the new text is encoded with it, never retrained."""
    (tmp_path / "corpus.txt").write_text(corpus_text[:40_000], encoding="utf-8")
    base_data = prepare(PrepareConfig(inputs=[str(tmp_path / "corpus.txt")], out=str(tmp_path / "bpe-data"),
                                      tokenizer="bpe", vocab_size=300))
    base = tmp_path / "base"
    train(launching.build_train_config(None, None, {**TINY, "max_iters": 10}), base_data, base, **QUIET)
    book = tmp_path / "book.txt"
    book.write_text(corpus_text[-12_000:], encoding="utf-8")  # text the BPE was not trained on
    out = tmp_path / "ft"
    flags = [f"--{k}={v}" for k, v in {**RUN, "max_iters": 2, "eval_interval": 1, "learning_rate": 1e-9,
                                       "min_lr": 0, "warmup_iters": 0}.items()]
    code, _, err = run_cli(capsys, "train", str(book), "--init-from", str(base), "--out", str(out), *flags)
    assert code == 0, err
    base_lm, lm = load(base), load(out)
    assert lm.tokenizer.kind == "bpe" and lm.tokenizer.to_dict() == base_lm.tokenizer.to_dict()
    data_dir = out / rundir.DATA
    ids, _ = open_tokens(data_dir / "train.bin")
    assert [int(t) for t in ids[:300]] == base_lm.tokenizer.encode(base_lm.tokenizer.decode([int(t) for t in ids[:300]]))
    assert base_lm.tokenizer.decode([int(t) for t in ids]).startswith(book.read_text(encoding="utf-8")[:2000])
    first = [m["val_loss"] for m in metrics(out) if "val_loss" in m][0]
    assert first == pytest.approx(eval_loss(base_lm.model, data_dir, TINY["block_size"]), abs=1e-3)
    code, _, err = run_cli(capsys, "train", str(book), "--init-from", str(base), "--out", str(tmp_path / "x"),
                           "--vocab-size", "500", *flags)
    assert code == 2 and "base model's own tokenizer (bpe)" in err and not (tmp_path / "x" / "data").exists()


@pytest.mark.slow
def test_resume_of_a_finetune_continues_exactly(gpt2_folder, book, tmp_path, monkeypatch):
    kw = dict(lr_decay_iters=8, eval_interval=4, learning_rate=1e-3, warmup_iters=2, block_size=32,
              batch_size=4)  # dropout 0.1 (the preset's): the RNG state must resume too
    launching.launch(request(book, gpt2_folder, tmp_path / "straight", max_iters=8, **kw), **QUIET)
    launching.launch(request(book, gpt2_folder, tmp_path / "resumed", max_iters=4, **kw), **QUIET)
    monkeypatch.setattr(launching, "load_base", lambda src: pytest.fail("the base model was reloaded"))
    resumed = launching.launch(launching.TrainRequest(out=str(tmp_path / "resumed"), resume=True,
                                                      overrides={"max_iters": 8}), **QUIET)
    assert resumed.result.iters == 8
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    key = lambda lines, k: {m["iter"]: m[k] for m in lines if k in m}  # noqa: E731
    assert list(key(a, "loss")) == list(key(b, "loss")) == list(range(1, 9))
    assert key(a, "loss") == pytest.approx(key(b, "loss"), abs=1e-5)
    assert key(a, "val_loss") == pytest.approx(key(b, "val_loss"), abs=1e-5)
    assert rundir.read_config(tmp_path / "resumed")[1]["init_from"]["kind"] == "huggingface"
    assert "Fine-tuned from:**" in (tmp_path / "resumed" / "report.md").read_text()
