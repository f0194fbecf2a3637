"""The inspection commands in cli/inspection.py: `pocketgpt tokenize` and its errors."""

import json

import pytest

from pocketgpt.tokenizer import load_tokenizer

from helpers import run_cli


def test_tokenize_command(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "tokenize", "--tokenizer", "gpt2", "Hello world 😀")
    result = json.loads(out)
    assert code == 0 and result["ids"][:2] == [15496, 995]
    assert result["tokens"][:2] == ["Hello", " world"]
    # the emoji's 4 bytes are spread over tokens that are not characters on their own
    assert "".join(result["bytes"][2:]) == " 😀".encode().hex() and "\ufffd" in "".join(result["tokens"])

    code, out, _ = run_cli(capsys, "tokenize", "--tokenizer", "char", "To be")
    assert code == 0 and json.loads(out)["tokens"] == ["T", "o", " ", "b", "e"]

    src = tmp_path / "t.txt"
    src.write_text("to be or not to be, that is the question. " * 30, encoding="utf-8")
    run_cli(capsys, "prepare", src, "--out", tmp_path / "d", "--tokenizer", "bpe", "--vocab-size", "300")
    code, out, _ = run_cli(capsys, "tokenize", "--data", tmp_path / "d", "to be é")
    result = json.loads(out)
    tok = load_tokenizer(tmp_path / "d" / "tokenizer.json")
    assert code == 0 and result["ids"] == tok.encode("to be é")
    assert bytes.fromhex("".join(result["bytes"])).decode() == "to be é"  # é: two byte tokens


@pytest.mark.parametrize("argv,match", [
    (["tokenize", "x"], "exactly one of"),
    (["tokenize", "--tokenizer", "gpt2", "--data", "d", "x"], "exactly one of"),
    (["tokenize", "--tokenizer", "bpe", "x"], "trained on your text"),
    (["tokenize", "--tokenizer", "gtp2", "x"], "did you mean 'gpt2'"),
])
def test_tokenize_errors(capsys, argv, match):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1
