"""A pretrained model's own tokenizer (kind hf): ids equal transformers' AutoTokenizer, its start and
end tokens, a Llama folder with it loaded, prepared, fine-tuned and exported back. No downloads: the
tokenizers are trained here with `tokenizers`, in the two layouts the open families ship (byte-level
BPE split by Qwen's / Llama 3's pattern; SentencePiece-style BPE with byte fallback, TinyLlama's)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

from helpers import hf_logits, max_diff, run_cli  # noqa: E402

from pocketgpt.loading import end_ids, load, prompt_ids  # noqa: E402
from pocketgpt.tokenizer import PretrainedTokenizer, StreamDecoder, load_tokenizer, tokenizer_from_dict  # noqa: E402

# Qwen2's split pattern (a published fact of its tokenizer.json): punctuation joins the newlines after it
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
MIXED = ("Café déjà vu — naïve façade!\n\n  def f(x):\n\treturn {'a': x ** 2}  # 🚀🎉\n"
         "東京は日本の首都です。 Ωμέγα, Привет мир.\r\n1234567 + 89 = 1234656...\n\n\nend")
TRAIN_TEXT = (MIXED + " The quick brown fox jumps over the lazy dog. ") * 40
VOCAB = 512  # the model's rows: more than the tokenizer's ids, as Qwen's embedding has


def byte_level_tokenizer(bos: bool) -> Tokenizer:
    """Qwen-like (no start token) or, with bos, Llama 3-like (<|begin_of_text|> before every text)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (["<|begin_of_text|>"] if bos else [])
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([TRAIN_TEXT], trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        b = tk.token_to_id("<|begin_of_text|>")
        tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                          special_tokens=[("<|begin_of_text|>", b)])
    return tk


def sentencepiece_tokenizer() -> Tokenizer:
    """TinyLlama-like: a word marker for spaces, <0xNN> tokens for bytes the merges lack, <s> first."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.train_from_iterator([TRAIN_TEXT.replace("東京は日本の首都です。", "")], trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return tk


def save_hf_tokenizer(folder: Path, tk: Tokenizer, bos: str | None, eos: str, eos_ids: list[int] | None = None,
                      template: str | None = None) -> None:
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos)
    if template:
        fast.chat_template = template
    fast.save_pretrained(str(folder))
    if eos_ids is not None:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))


@pytest.fixture(params=["qwen", "llama3", "sentencepiece"])
def tok_folder(request, tmp_path) -> Path:
    d = tmp_path / request.param
    if request.param == "sentencepiece":
        save_hf_tokenizer(d, sentencepiece_tokenizer(), "<s>", "</s>")
    else:
        save_hf_tokenizer(d, byte_level_tokenizer(request.param == "llama3"),
                          "<|begin_of_text|>" if request.param == "llama3" else None, "<|endoftext|>")
    return d


def test_ids_equal_autotokenizers_on_mixed_text(tok_folder):
    ours = PretrainedTokenizer.from_folder(tok_folder, VOCAB)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tok_folder))
    for text in (MIXED, MIXED[7:50], " leading space", "trailing\n\n", "x"):
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.encode_prompt(text) == theirs(text).input_ids  # its own start token, where it has one
        assert ours.decode(ids) == theirs.decode(ids)
    assert ours.decode(ours.encode(MIXED)) == (MIXED if tok_folder.name != "sentencepiece" else theirs.decode(
        theirs.encode(MIXED, add_special_tokens=False)))
    assert ours.encode("<|im_start|>hi") == theirs.encode("<|im_start|>hi", add_special_tokens=False)


def test_bits_per_byte_count_every_byte_of_the_text_once(tok_folder):
    ours = PretrainedTokenizer.from_folder(tok_folder, VOCAB)
    sizes = ours.token_bytes()
    assert len(sizes) == VOCAB and sizes[ours.known:].sum() == 0
    assert all(sizes[i] == 0 for i in ours.special.values())
    text = MIXED.replace("東京は日本の首都です。", "")  # the SentencePiece one spells these through bytes
    counted = int(sizes[ours.encode(text)].sum())
    # the SentencePiece word marker the tokenizer puts before the text is one byte the text lacks
    assert counted == len(text.encode("utf-8")) + (1 if tok_folder.name == "sentencepiece" else 0)


def test_start_and_end_tokens_come_from_the_folders_files(tmp_path):
    d = tmp_path / "m"
    tk = byte_level_tokenizer(bos=False)
    end, im_end = tk.token_to_id("<|endoftext|>"), tk.token_to_id("<|im_end|>")
    save_hf_tokenizer(d, tk, None, "<|im_end|>", eos_ids=[end, im_end])
    ours = PretrainedTokenizer.from_folder(d, VOCAB)
    assert ours.eot_id == im_end and ours.prompt_prefix == [] and end_ids(ours) == sorted([end, im_end])
    again = tokenizer_from_dict(json.loads(json.dumps(ours.to_dict())))  # what a run folder keeps
    assert again.to_dict() == ours.to_dict() and again.encode(MIXED) == ours.encode(MIXED)


def test_a_stream_of_ids_decodes_to_the_whole_text(tok_folder):
    ours = PretrainedTokenizer.from_folder(tok_folder, VOCAB)
    ids = ours.encode(MIXED * 3)  # past the decoder's 64-id window
    stream = StreamDecoder(ours)
    assert "".join(stream.push(i) for i in ids) == ours.decode(ids)


def test_damaged_or_missing_files_are_one_line(tmp_path):
    from pocketgpt.errors import PocketError

    with pytest.raises(PocketError, match="has no tokenizer.json"):
        PretrainedTokenizer.from_folder(tmp_path, VOCAB)
    save_hf_tokenizer(tmp_path, byte_level_tokenizer(False), None, "<|endoftext|>")
    with pytest.raises(PocketError, match="ids up to .* but the model only 100 rows"):
        PretrainedTokenizer.from_folder(tmp_path, 100)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}')
    with pytest.raises(PocketError, match="cannot be read by `tokenizers`"):
        PretrainedTokenizer.from_folder(tmp_path, VOCAB)


# ---------------------------------------------------------------- a Llama folder with its own tokenizer

def llama_folder(d: Path, tk: Tokenizer, seed: int = 0, flat_head: bool = False) -> Path:
    """A tiny Llama with tk; flat_head: a final norm of zeros, so every logit is 0 and greedy decoding
    picks id 0, <|endoftext|>, one of its end-of-sequence ids."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True, attn_implementation="eager")
    m = transformers.LlamaForCausalLM(cfg)
    if flat_head:
        with torch.no_grad():
            m.model.norm.weight.zero_()
    m.save_pretrained(str(d))
    save_hf_tokenizer(d, tk, "<|begin_of_text|>", "<|endoftext|>",
                      eos_ids=[tk.token_to_id("<|endoftext|>"), tk.token_to_id("<|im_end|>")])
    return d


@pytest.mark.slow
def test_a_llama_folder_generates_through_its_tokenizer_and_stops_at_its_end(tmp_path):
    tk = byte_level_tokenizer(bos=True)
    d = llama_folder(tmp_path / "m", tk)
    lm = load(d)
    assert lm.tokenizer.kind == "hf"
    ids = prompt_ids(lm.tokenizer, "Café 東京")
    assert ids == transformers.AutoTokenizer.from_pretrained(str(d))("Café 東京").input_ids
    assert max_diff(lm.logits(ids), hf_logits(d, ids)) < 1e-4
    assert lm.tokenizer.stop_ids == sorted([tk.token_to_id("<|endoftext|>"), tk.token_to_id("<|im_end|>")])
    flat = load(llama_folder(tmp_path / "flat", tk, flat_head=True))
    assert tk.token_to_id("<|endoftext|>") == 0
    [done] = flat.complete("Café", max_new_tokens=20, temperature=0)
    assert (done.completion_tokens, done.finish_reason, done.text) == (1, "stop", "")  # ended, by default


@pytest.mark.slow
def test_prepare_finetune_and_export_keep_the_models_tokenizer(capsys, tmp_path):
    from pocketgpt.data import open_tokens

    tk = byte_level_tokenizer(bos=True)
    base = llama_folder(tmp_path / "base", tk)
    text = MIXED.replace("\r", "") * 30
    book = tmp_path / "book.txt"
    book.write_text(text, encoding="utf-8")
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", str(book), "--init-from", str(base), "--out", str(run),
                             "--max-iters", "4", "--eval-interval", "4", "--eval-iters", "1", "--batch-size", "2",
                             "--block-size", "32")
    assert code == 0, err
    meta = json.loads((run / "data" / "meta.json").read_text())
    assert meta["tokenizer"] == "hf" and meta["vocab_size"] == VOCAB
    auto = transformers.AutoTokenizer.from_pretrained(str(base))
    n_train = int(len(text) * (1 - meta["val_fraction"]))
    # each side of the train/val cut encoded whole, as the model's own tokenizer encodes it
    assert np.array(open_tokens(run / "data" / "train.bin")[0]).tolist() == auto.encode(text[:n_train],
                                                                                       add_special_tokens=False)
    assert meta["splits"]["train"]["bytes"] == len(text[:n_train].encode("utf-8"))
    tok = load_tokenizer(run / "tokenizer.json")
    code, out, err = run_cli(capsys, "export", "--model", str(run), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert code == 0, err
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert back.encode(MIXED, add_special_tokens=False) == auto.encode(MIXED, add_special_tokens=False)
    assert back("hi").input_ids == auto("hi").input_ids
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == sorted([tk.token_to_id("<|endoftext|>"), tk.token_to_id("<|im_end|>")])
    ids = tok.encode_prompt("Café déjà vu")
    assert max_diff(load(run).logits(ids), hf_logits(tmp_path / "hf", ids)) < 1e-4
    assert load(tmp_path / "hf").tokenizer.to_dict() == tok.to_dict()


def test_a_long_declared_context_is_fine_tuned_at_a_laptops_length_unless_asked():
    from pocketgpt.config import ModelConfig
    from pocketgpt.launch import FINETUNE_CONTEXT, TrainRequest, finetune_config

    base = ModelConfig(vocab_size=VOCAB, block_size=40960, n_layer=2, n_head=4, n_embd=32, pos_emb="rope",
                       norm="rmsnorm", mlp="swiglu", n_kv_head=2, mlp_width=48)
    said: list[str] = []
    cfg = finetune_config(TrainRequest(), {}, base, said.append)
    assert cfg.model.block_size == FINETUNE_CONTEXT == 1024
    assert any("context 1024 of the base model's 40960" in s for s in said)
    asked = finetune_config(TrainRequest(), {"block_size": 4096}, base, said.append)
    assert asked.model.block_size == 4096
    gpt2_like = finetune_config(TrainRequest(), {}, ModelConfig(vocab_size=VOCAB, block_size=1024), said.append)
    assert gpt2_like.model.block_size == 1024
    # another preset's recipe, the base's shape: demo's context (64), layers and width give way to the base's
    demo = finetune_config(TrainRequest(preset="demo"), {}, base, said.append)
    assert (demo.model.block_size, demo.model.n_layer, demo.model.n_embd) == (1024, 2, 32)
    assert demo.optim.learning_rate == 6e-3


# ---------------------------------------------------------------- GGUF and Ollama

def _gguf_fields(path: Path) -> dict:
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(path))
    out = {}
    for name, f in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        parts = [f.parts[i] for i in f.data]
        if name in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            out[name] = [bytes(p).decode("utf-8") for p in parts]
        elif name == "tokenizer.ggml.token_type":
            out[name] = [int(p[0]) for p in parts]
        elif name == "tokenizer.ggml.scores":
            out[name] = [float(p[0]) for p in parts]
        elif isinstance(parts[0], np.ndarray) and parts[0].dtype == np.uint8:
            out[name] = bytes(parts[0]).decode("utf-8")
        else:
            out[name] = parts[0].tolist()[0]
    return out


def test_a_pretrained_tokenizer_goes_into_gguf_and_ollama_as_it_came(capsys, tmp_path):
    tk = byte_level_tokenizer(bos=True)
    d = llama_folder(tmp_path / "m", tk)
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    code, out, err = run_cli(capsys, "export", "--model", str(d), "--format", "ollama", "--out", str(tmp_path / "o"))
    assert code == 0, err
    f = _gguf_fields(tmp_path / "o" / "model.gguf")
    vocab = tk.get_vocab(with_added_tokens=True)
    assert f["tokenizer.ggml.pre"] == "qwen2" and f["tokenizer.ggml.model"] == "gpt2"
    assert len(f["tokenizer.ggml.tokens"]) == VOCAB  # padded to the model's rows
    assert all(f["tokenizer.ggml.tokens"][i] == t for t, i in vocab.items())
    assert f["tokenizer.ggml.bos_token_id"] == vocab["<|begin_of_text|>"]
    assert f["tokenizer.ggml.eos_token_id"] == vocab["<|endoftext|>"]
    assert f["tokenizer.ggml.eot_token_id"] == vocab["<|im_end|>"] and f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.chat_template"].startswith("{% for m in messages %}")
    assert f["tokenizer.ggml.token_type"][vocab["<|im_start|>"]] == 3  # CONTROL
    assert len(f["tokenizer.ggml.merges"]) == len(json.loads((d / "tokenizer.json").read_text())["model"]["merges"])
    modelfile = (tmp_path / "o" / "Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and "TEMPLATE" not in modelfile  # the GGUF's template is Ollama's
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "<|endoftext|>"' in modelfile


def test_a_sentencepiece_tokenizer_goes_into_gguf_as_llama_cpps_llama_vocabulary(capsys, tmp_path):
    tk = sentencepiece_tokenizer()
    d = tmp_path / "m"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)).save_pretrained(str(d))
    save_hf_tokenizer(d, tk, "<s>", "</s>")
    code, _, err = run_cli(capsys, "export", "--model", str(d), "--format", "gguf", "--out", str(tmp_path / "m.gguf"))
    assert code == 0, err
    f = _gguf_fields(tmp_path / "m.gguf")
    vocab = tk.get_vocab(with_added_tokens=True)
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_space_prefix"] is True
    tokens, types, scores = (f[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    assert len(tokens) == len(types) == len(scores) == VOCAB and all(tokens[i] == t for t, i in vocab.items())
    assert types[vocab["<unk>"]] == 2 and types[vocab["<s>"]] == 3 and types[vocab["<0x0A>"]] == 6  # UNKNOWN CONTROL BYTE
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (vocab["<s>"], vocab["</s>"])
    assert f["tokenizer.ggml.unknown_token_id"] == vocab["<unk>"] and f["tokenizer.ggml.add_bos_token"] is True
    merges = json.loads((d / "tokenizer.json").read_text())["model"]["merges"]
    first, last = ("".join(m) if isinstance(m, list) else m.replace(" ", "") for m in (merges[0], merges[-1]))
    # the first merge's token scores highest of all merged tokens: llama.cpp merges in tokenizer.json's order
    assert scores[vocab[first]] == -1.0 and scores[vocab[last]] < scores[vocab[first]]
    assert scores[vocab["<0x41>"]] == 0.0


def test_a_run_without_a_chat_template_is_a_plain_continuer_in_ollama(capsys, tmp_path):
    from pocketgpt.gguf_export import modelfile
    from pocketgpt.tokenizer import GPT2Tokenizer

    text = modelfile(GPT2Tokenizer())
    assert 'TEMPLATE """{{ .Prompt }}"""' in text and 'PARAMETER stop "<|endoftext|>"' in text


def test_llama_cpp_names_each_split_and_refuses_the_rest(tmp_path):
    from pocketgpt.errors import PocketError
    from pocketgpt.gguf_export import LLAMA3_SPLIT, pretrained_pre

    def named(tk: Tokenizer) -> str:
        save_hf_tokenizer(tmp_path / "t", tk, None, "<|endoftext|>")
        return pretrained_pre(PretrainedTokenizer.from_folder(tmp_path / "t", VOCAB))

    assert named(byte_level_tokenizer(bos=False)) == "qwen2"
    llama3 = byte_level_tokenizer(bos=False)
    llama3.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert named(llama3) == "llama-bpe"
    smol = byte_level_tokenizer(bos=False)
    smol.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    assert named(smol) == "smollm"
    with pytest.raises(PocketError, match="only byte-level BPE vocabularies"):
        save_hf_tokenizer(tmp_path / "sp", sentencepiece_tokenizer(), "<s>", "</s>")
        pretrained_pre(PretrainedTokenizer.from_folder(tmp_path / "sp", VOCAB))


def test_a_model_too_big_for_this_machine_is_refused_before_loading(tmp_path, monkeypatch):
    from pocketgpt.errors import PocketError

    d = llama_folder(tmp_path / "m", byte_level_tokenizer(bos=True))
    (d / "model.safetensors").write_bytes(b"not read")  # refused before any weight is read
    monkeypatch.setattr("pocketgpt.runtime.machine_memory_mb", lambda: 0.01)
    with pytest.raises(PocketError, match=r"has [\d,]+ parameters: ~0 MB as float32 to load, but this machine has "
                                          r"0 MB of memory; choose a smaller model"):
        load(d)


def test_the_cli_inspects_a_pretrained_folder_with_its_tokenizer(capsys, tmp_path):
    tk = byte_level_tokenizer(bos=True)
    d = llama_folder(tmp_path / "m", tk)
    code, out, err = run_cli(capsys, "tokenize", "--model", str(d), "Café 東京")
    assert code == 0, err
    assert json.loads(out)["ids"] == transformers.AutoTokenizer.from_pretrained(str(d)).encode(
        "Café 東京", add_special_tokens=False)
    code, out, err = run_cli(capsys, "info", "--model", str(d))
    assert code == 0 and f"hf tokenizer with {VOCAB} tokens" in out
