"""Chat fine-tuning data (conversations.py, data.pack_chats): the forms people have, one-line errors for bad
lines, the answer tokens marked exactly, packing that neither splits nor loses a conversation, and a
fine-tune whose loss counts the answers only."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from helpers import run_cli  # noqa: E402
from test_chat import TEMPLATE, with_template  # noqa: E402
from test_pretrained_tokenizer import byte_level_tokenizer, llama_folder  # noqa: E402

from pocketgpt.conversations import ChatFormat, Conversation, read_conversations, read_inputs  # noqa: E402
from pocketgpt.data import IGNORE, pack_chats  # noqa: E402
from pocketgpt.errors import PocketError  # noqa: E402
from pocketgpt.tokenizer import PretrainedTokenizer  # noqa: E402

ANSWER = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return with_template(llama_folder(tmp_path_factory.mktemp("m") / "m", byte_level_tokenizer(bos=True)), TEMPLATE)


def test_every_form_becomes_the_same_turns(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    forms = {
        "messages": {"messages": [system, *ANSWER]},
        "sharegpt": {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi?"},
                                                             {"from": "gpt", "value": "Hello."}]},
        "sharegpt-roles": {"conversations": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Hi?"},
                                             {"role": "assistant", "content": "Hello."}]},
        "prompt": {"system": "Be brief.", "prompt": "Hi?", "completion": "Hello."},
    }
    for name, row in forms.items():
        [conv] = read_conversations(jsonl(tmp_path / f"{name}.jsonl", [row]))
        assert conv.messages == [system, *ANSWER], name
        assert conv.source == f"{tmp_path / name}.jsonl line 1"
    [alpaca, plain] = read_conversations(jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Sum these.", "input": "2 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi."}]))
    assert alpaca.messages == [{"role": "user", "content": "Sum these.\n\n2 3"}, {"role": "assistant", "content": "5"}]
    assert plain.messages[0] == {"role": "user", "content": "Say hi."}


@pytest.mark.parametrize("line, says", [
    ("{not json", "line 2: not JSON"),
    ({"messages": [{"role": "user", "content": "Hi?"}]}, "line 2: no assistant turn"),
    ({"messages": [{"role": "robot", "content": "Hi?"}]}, "line 2: turn 1 has the unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "  "}, ANSWER[1]]}, "line 2: turn 1 is empty"),
    ({"prompt": "Hi?", "completion": "Hello."}, "line 2: a 'prompt' conversation in a file of 'messages' ones"),
    ({"text": "Hi"}, "line 2: not a conversation"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "line 2: turn 1 has the unknown role 'alien'"),
])
def test_a_bad_line_is_one_error_naming_the_file_and_line(tmp_path, line, says):
    first = {"conversations": ANSWER} if isinstance(line, dict) and "conversations" in line else {"messages": ANSWER}
    path = jsonl(tmp_path / "chats.jsonl", [first, line])
    with pytest.raises(PocketError, match=f"^{path} {says}"):
        read_conversations(path)


def test_a_bad_line_fails_the_command_before_anything_is_written(capsys, tmp_path, chat_model):
    path = jsonl(tmp_path / "chats.jsonl", [{"messages": ANSWER}] * 3 + [{"messages": ANSWER[:1]}])
    code, out, err = run_cli(capsys, "train", str(path), "--init-from", str(chat_model), "--out", str(tmp_path / "run"))
    assert code == 2 and err.strip().count("\n") == 0 and "line 4: no assistant turn" in err
    assert not (tmp_path / "run").exists()
    code, _, err = run_cli(capsys, "train", str(path), "--out", str(tmp_path / "run"))
    assert code == 2 and "add --init-from MODEL" in err and not (tmp_path / "run").exists()


def test_the_ids_are_transformers_and_only_the_answers_are_marked(chat_model):
    tok = PretrainedTokenizer.from_folder(chat_model, 512)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Où est 東京? 🚀"},
                {"role": "assistant", "content": "Japan, 日本 🗾."}, {"role": "user", "content": "Japan?"},
                {"role": "assistant", "content": "Japan."}]
    enc = ChatFormat(tok).encode(Conversation(messages, "x line 1"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(chat_model))
    assert enc.ids == theirs.apply_chat_template(messages, tokenize=True, return_dict=False)
    marked = [i for i, m in zip(enc.ids, enc.mask) if m]
    # the answers' text and the end-of-turn marker after each (so the model learns to stop); nothing else
    assert tok.decode(marked) == "Japan, 日本 🗾.<|im_end|>Japan.<|im_end|>"
    first, whole = enc.exchanges
    assert whole == len(enc.ids) and tok.decode(enc.ids[:first]).endswith("日本 🗾.<|im_end|>")
    assert tok.decode(enc.ids[first:]).startswith("\n<|im_start|>user\nJapan?")


def pieces_of(rows: np.ndarray) -> list[tuple[int, ...]]:
    """The conversations in packed rows: each is a run of ids that starts with its marker id >= 1000."""
    found = []
    for row in rows:
        cuts = [i for i, t in enumerate(row) if t >= 1000] + [len(row)]
        found += [tuple(int(t) for t in row[a:b] if t != 0) for a, b in zip(cuts, cuts[1:])]
    return found


def test_packing_splits_no_conversation_and_loses_or_repeats_none():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, size=300)
    convs, mask, exchanges = [], [], []
    for k, n in enumerate(lengths):
        convs.append([1000 + k] + list(rng.integers(1, 999, size=n - 1)))
        mask += [0, *rng.integers(0, 2, size=n - 1)]
        exchanges.append([int(n)])
    tokens = np.concatenate([np.asarray(c) for c in convs])
    packed = pack_chats(tokens, np.asarray(mask), exchanges, [f"f line {i}" for i in range(300)], block_size=63)
    assert sorted(pieces_of(packed.tokens)) == sorted(tuple(c) for c in convs)
    assert packed.cut == 0 and packed.padding < 0.05  # best fit leaves little room
    used = int(lengths.sum())
    assert packed.padding == pytest.approx(1 - used / packed.tokens.size)
    # a target counts exactly where the next token is marked
    flat_mask = {}
    for c, m in zip(convs, np.split(np.asarray(mask), np.cumsum(lengths)[:-1])):
        flat_mask[c[0]] = m
    for row, targets in zip(packed.tokens, packed.targets):
        for i in range(len(targets)):
            assert (targets[i] != IGNORE) == (row[i + 1] != 0 and _marked(row, i + 1, flat_mask))
            if targets[i] != IGNORE:
                assert targets[i] == row[i + 1]


def _marked(row: np.ndarray, i: int, masks: dict) -> bool:
    start = max(j for j in range(i + 1) if row[j] >= 1000)
    return bool(masks[int(row[start])][i - start])


def test_a_long_conversation_keeps_the_exchanges_that_fit_and_a_first_too_long_is_refused():
    tokens, mask = np.arange(1, 31), np.ones(30, dtype=np.int64)
    packed = pack_chats(tokens, mask, [[10, 20, 30]], ["f line 1"], block_size=24)
    assert packed.cut == 1 and packed.tokens[0, :20].tolist() == list(range(1, 21)) and packed.tokens[0, 20:].sum() == 0
    with pytest.raises(PocketError, match="^f line 1: its first exchange is 10 tokens, more than the context of 8 "):
        pack_chats(tokens, mask, [[10, 20, 30]], ["f line 1"], block_size=8)


def test_a_val_file_beside_the_inputs_is_the_held_out_split(tmp_path):
    jsonl(tmp_path / "train.jsonl", [{"messages": ANSWER}] * 5)
    jsonl(tmp_path / "val.jsonl", [{"prompt": "Q?", "completion": "A."}])
    got = read_inputs([str(tmp_path / "train.jsonl")], 0.5)
    assert len(got.train) == 5 and [c.messages[0]["content"] for c in got.val] == ["Q?"]
    got = read_inputs([str(tmp_path)], 0.5)  # a folder: val.jsonl inside is the held-out split too
    assert len(got.train) == 5 and len(got.val) == 1
    (tmp_path / "val.jsonl").unlink()
    got = read_inputs([str(tmp_path / "train.jsonl")], 0.4)
    assert (len(got.train), len(got.val)) == (3, 2)
    assert got.examples(1) == [{"messages": ANSWER[:1], "reference": "Hello."}]


@pytest.mark.slow
def test_the_loss_counts_the_answers_only(capsys, tmp_path, chat_model):
    """User turns of random letters cannot be predicted, the answer always can: the answers-only loss goes to
    near zero while the loss over every token of the same conversations stays high."""
    import torch

    import pocketgpt
    from pocketgpt.data import open_chat_split

    rng = random.Random(0)
    rows = [{"messages": [{"role": "user", "content": "".join(rng.choice("abcdefghijklmnop") for _ in range(24))},
                          {"role": "assistant", "content": "Yes."}]} for _ in range(120)]
    path = jsonl(tmp_path / "chats.jsonl", rows)
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", str(path), "--init-from", str(chat_model), "--out", str(run),
                             "--max-iters", "150", "--eval-interval", "150", "--eval-iters", "2", "--batch-size", "8",
                             "--block-size", "64", "--learning-rate", "1e-2", "--eval-sample-tokens", "8")
    assert code == 0, err
    assert "answer tokens trained on, padding" in out and "answer: 'Yes.' (reference: 'Yes.')" in out
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line][-1]
    assert final["val_loss"] < 0.05
    model = pocketgpt.load(run).model.eval()
    _, packed = open_chat_split(run / "data", "val", 64)
    x = torch.from_numpy(packed.tokens[:, :-1])
    real = packed.tokens[:, 1:] != 0  # every token of the conversations, padding aside
    every = torch.from_numpy(np.where(real, packed.tokens[:, 1:], IGNORE))
    with torch.no_grad():
        _, masked = model(x, torch.from_numpy(packed.targets))
        _, unmasked = model(x, every)
    assert float(masked) < 0.05 and float(unmasked) > 0.5
    code, out, err = run_cli(capsys, "eval", "--model", str(run), "--json")
    assert code == 0, err
    scored = json.loads(out)
    assert scored["loss"] < 0.05 and scored["tokens"] == int((packed.targets != IGNORE).sum())  # the answers only
    assert (run / "samples.txt").read_text().count("reference: Yes.") == 3


# ---------------------------------------------------------------- pocketgpt's own turn tokens (a model without a template)

def turn_tokenizers() -> list:
    from pocketgpt.tokenizer import CharTokenizer, GPT2Tokenizer, train_bpe

    text = "Hi there, how are you? Fine: thanks.\n" * 20
    return [CharTokenizer(text), GPT2Tokenizer(), train_bpe([text], 300)]


@pytest.mark.parametrize("base", turn_tokenizers(), ids=lambda t: t.kind)
def test_turn_tokens_follow_the_base_ids_and_change_none_of_them(base):
    from pocketgpt.chat import CHAT_TOKENS, WithChatTokens, chat_prompt
    from pocketgpt.tokenizer import tokenizer_from_dict

    tok = WithChatTokens(base)
    assert tok.vocab_size == base.vocab_size + 4 and tok.kind == base.kind
    text = "Hi there, how are you?"
    assert tok.encode(text) == base.encode(text)  # plain text: the base's ids
    messages = [{"role": "system", "content": "Fine"}, {"role": "user", "content": text}]
    ids = chat_prompt(tok, messages).prompt
    turns = [i for i in ids if i >= base.vocab_size]
    assert [CHAT_TOKENS[i - base.vocab_size] for i in turns] == ["<|system|>", "<|end|>", "<|user|>", "<|end|>",
                                                                 "<|assistant|>"]
    assert tok.decode(ids) == f"<|system|>Fine<|end|>\n<|user|>{text}<|end|>\n<|assistant|>"
    assert tok.stop_ids[-1] == base.vocab_size + 3 and list(tok.token_bytes()[-4:]) == [0, 0, 0, 0]
    back = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert back.encode(tok.decode(ids)) == ids and back.chat_template == tok.chat_template
    full = tok.decode(ids) + "Fine: thanks.<|end|>\n"
    enc = ChatFormat(tok).encode(Conversation([*messages, {"role": "assistant", "content": "Fine: thanks."}], "x"))
    assert enc.ids == tok.encode(full)
    assert tok.decode([i for i, m in zip(enc.ids, enc.mask) if m]) == "Fine: thanks.<|end|>"


def test_new_rows_are_the_mean_and_every_existing_logit_stays(tmp_path):
    import torch

    from helpers import untrained_run

    import pocketgpt
    from pocketgpt.tokenizer import CharTokenizer

    for tied in (True, False):
        (tmp_path / str(tied)).mkdir()
        gpt = pocketgpt.load(untrained_run(tmp_path / str(tied), CharTokenizer("abcdefgh "),
                                           tie_embeddings=tied)).model.eval()
        grown = gpt.with_vocab(gpt.config.vocab_size + 4).eval()
        ids = torch.tensor([[0, 3, 5, 8, 1]])
        with torch.no_grad():
            before, after = gpt(ids)[0][0], grown(ids)[0][0]
        assert torch.allclose(after[:, :9], before, atol=1e-6, rtol=0)  # a wider head: only float rounding
        wte = grown.transformer.wte.weight
        assert torch.allclose(wte[9:], gpt.transformer.wte.weight.mean(0).expand(4, -1))
        assert torch.allclose(after[:, 9:], after[:, 9:10].expand(-1, 4))  # the new ids' logits: all one
        assert (grown.lm_head.weight is wte) == tied


@pytest.mark.slow
def test_a_run_trained_from_scratch_learns_to_answer_with_pocketgpts_turns(capsys, monkeypatch, tmp_path):
    import io

    from helpers import tiny_flags

    import pocketgpt

    book = tmp_path / "book.txt"
    book.write_text("Yes, no, maybe. What is it? Who goes there?\n" * 200)
    code, _, err = run_cli(capsys, "train", str(book), "--out", str(tmp_path / "pre"), *tiny_flags(block_size=96))
    assert code == 0, err
    pairs = [("What is it?", "Yes"), ("Who goes there?", "maybe")]
    rows = [{"messages": [{"role": r, "content": c} for q, a in order for r, c in (("user", q), ("assistant", a))]}
            for order in (pairs, pairs[::-1]) * 40]
    chats = jsonl(tmp_path / "chats.jsonl", rows)
    code, out, err = run_cli(capsys, "train", str(chats), "--init-from", str(tmp_path / "pre"), "--lora-rank", "4",
                             "--out", str(tmp_path / "lora"))
    assert code == 2 and "fine-tune it in full (drop --lora-rank)" in err and not (tmp_path / "lora" / "data").exists()
    code, out, err = run_cli(capsys, "train", str(chats), "--init-from", str(tmp_path / "pre"), "--out",
                             str(tmp_path / "sft"), "--max-iters", "120", "--learning-rate", "3e-3",
                             "--eval-interval", "60", "--batch-size", "8", "--eval-sample-tokens", "6")
    assert code == 0, err
    assert "pocketgpt's turn tokens <|system|> <|user|> <|assistant|> <|end|> are added" in out
    lm = pocketgpt.load(tmp_path / "sft")
    assert lm.tokenizer.chat_template and lm.model.config.vocab_size == lm.tokenizer.vocab_size
    assert lm.chat([{"role": "user", "content": "What is it?"}], temperature=0.0, max_new_tokens=20) == "Yes"
    monkeypatch.setattr("sys.stdin", io.StringIO("What is it?\nWho goes there?\n"))
    code, out, err = run_cli(capsys, "chat", "--model", str(tmp_path / "sft"), "--temperature", "0",
                             "--max-new-tokens", "20")
    assert code == 0, err
    assert out.split() == ["Yes", "maybe"]  # each reply ends at <|end|>, which is never shown
    bad = jsonl(tmp_path / "bad.jsonl", rows + [{"messages": [{"role": "user", "content": "Who?"},
                                                              {"role": "assistant", "content": "Nobody"}]}])
    code, out, err = run_cli(capsys, "train", str(bad), "--init-from", str(tmp_path / "pre"), "--out",
                             str(tmp_path / "bad"))
    assert code == 2 and f"{bad} line 81: the text contains 'N'" in err


@pytest.mark.parametrize("base", turn_tokenizers(), ids=lambda t: t.kind)
def test_an_export_carries_the_turn_tokens_and_template(capsys, tmp_path, base):
    """transformers reads the exported folder and renders a conversation to pocketgpt's very ids, and the
    model's logits on them are pocketgpt's."""
    from helpers import hf_logits, max_diff, untrained_run

    import pocketgpt
    from pocketgpt.chat import WithChatTokens, chat_prompt

    tok = WithChatTokens(base)
    run = untrained_run(tmp_path, tok)
    code, _, err = run_cli(capsys, "export", "--model", str(run), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert code == 0, err
    messages = [{"role": "system", "content": "Fine"}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Fine: thanks."}, {"role": "user", "content": "Hi"}]
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ours = chat_prompt(tok, messages).prompt
    assert theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) == ours
    assert theirs.decode(ours) == tok.decode(ours)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert tok.first + 3 in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
    assert max_diff(pocketgpt.load(run).logits(ours[-32:]), hf_logits(tmp_path / "hf", ours[-32:])) < 1e-4


@pytest.mark.parametrize("base", turn_tokenizers(), ids=lambda t: t.kind)
def test_gguf_and_ollama_carry_the_turn_tokens_and_template(capsys, tmp_path, base):
    pytest.importorskip("gguf")
    from helpers import untrained_run
    from test_pretrained_tokenizer import _gguf_fields

    from pocketgpt.chat import CHAT_TEMPLATE, CHAT_TOKENS, WithChatTokens

    tok = WithChatTokens(base)
    run = untrained_run(tmp_path, tok)
    code, _, err = run_cli(capsys, "export", "--model", str(run), "--format", "ollama", "--out", str(tmp_path / "o"))
    assert code == 0, err
    f = _gguf_fields(tmp_path / "o" / "model.gguf")
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert tokens[base.vocab_size:base.vocab_size + 4] == list(CHAT_TOKENS)
    assert types[base.vocab_size:base.vocab_size + 4] == [3] * 4  # CONTROL: whole tokens, never split
    assert f["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert f["tokenizer.ggml.eos_token_id"] == base.vocab_size + 3  # <|end|> ends the turn
    modelfile = (tmp_path / "o" / "Modelfile").read_text()
    assert "<|{{ .Role }}|>{{ .Content }}<|end|>" in modelfile and 'PARAMETER stop "<|end|>"' in modelfile


@pytest.mark.slow
def test_a_lora_chat_fine_tune_resumes_exactly(capsys, tmp_path, chat_model):
    """Stopped at iter 4 and resumed, a LoRA fine-tune on conversations logs the losses of one that ran
    straight through: the packed rows and the draws depend on the seed and step alone."""
    from helpers import metrics

    rows = [{"messages": [{"role": "user", "content": f"Question {k}?"}, {"role": "assistant", "content": f"A{k}."}]}
            for k in range(30)]
    chats = jsonl(tmp_path / "chats.jsonl", rows)
    flags = ["--init-from", str(chat_model), "--lora-rank", "4", "--batch-size", "4", "--block-size", "48",
             "--eval-interval", "4", "--eval-iters", "2", "--eval-sample-tokens", "0", "--log-interval", "1"]
    code, _, err = run_cli(capsys, "train", str(chats), "--out", str(tmp_path / "straight"), "--max-iters", "8", *flags)
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", str(chats), "--out", str(tmp_path / "resumed"), "--max-iters", "4", *flags)
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "resumed"), "--resume", "--max-iters", "8")
    assert code == 0, err
    losses = [[(m["iter"], m.get("loss"), m.get("val_loss")) for m in metrics(tmp_path / run) if "iter" in m]
              for run in ("straight", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) >= 8


def test_the_server_and_the_cli_chat_through_pocketgpts_turns(capsys, monkeypatch, tmp_path):
    """A run with pocketgpt's turn tokens: /v1/chat/completions renders messages with its template (prompt tokens
    counted as chat_prompt's ids), and the CLI's conversation, once longer than the context, loses its oldest
    exchanges, said once."""
    import io

    pytest.importorskip("fastapi")
    import httpx
    from helpers import untrained_run
    from test_serve import Served

    from pocketgpt.chat import WithChatTokens, chat_prompt
    from pocketgpt.tokenizer import CharTokenizer

    tok = WithChatTokens(CharTokenizer("abcdefghijklmnopqrstuvwxyz ?.\n"))
    run = untrained_run(tmp_path, tok)  # context 32
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    served = Served(run)
    try:
        got = httpx.post(served.url + "/v1/chat/completions", timeout=30,
                         json={"model": "m", "messages": messages, "max_tokens": 3, "temperature": 0}).json()
        assert got["usage"]["prompt_tokens"] == len(chat_prompt(tok, messages).prompt)
    finally:
        served.close()
    monkeypatch.setattr("sys.stdin", io.StringIO("one two three\nfour five six\nseven eight\nnine ten\n"))
    code, out, err = run_cli(capsys, "chat", "--model", str(run), "--max-new-tokens", "4", "--seed", "1")
    assert code == 0 and "error" not in err, err
    assert out.count("the conversation outgrew the model's context of 32 tokens") == 1


def test_a_chat_message_goes_on_past_a_line_ending_in_a_backslash(capsys, monkeypatch, tmp_path):
    import io

    from helpers import untrained_run

    from pocketgpt.chat import WithChatTokens
    from pocketgpt.loading import LoadedModel
    from pocketgpt.tokenizer import CharTokenizer

    run = untrained_run(tmp_path, WithChatTokens(CharTokenizer("abcdefghijklmnopqrstuvwxyz :;\n")))
    heard: list[list[dict]] = []

    def reply(self, messages, settings=None, **changes):
        heard.append([dict(m) for m in messages])
        yield "ok"

    monkeypatch.setattr(LoadedModel, "chat_stream", reply)
    monkeypatch.setattr("sys.stdin", io.StringIO("say this loudly:\\\noh if you love\nnext\\\n"))
    code, out, err = run_cli(capsys, "chat", "--model", str(run))
    assert code == 0, err
    assert [m[-1]["content"] for m in heard] == ["say this loudly:\noh if you love", "next"]
