"""Chat through a model's own template (chat.py): rendered as transformers renders it, in the CLI's
conversation and the server's /v1/chat/completions; a template that fails is one line; a model
without one keeps the role-line transcript (tests/test_serve.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from helpers import run_cli  # noqa: E402
from test_pretrained_tokenizer import byte_level_tokenizer, llama_folder  # noqa: E402

from pocketgpt.chat import chat_prompt, render, transcript  # noqa: E402
from pocketgpt.errors import PocketError  # noqa: E402
from pocketgpt.tokenizer import PretrainedTokenizer  # noqa: E402

# ChatML, as Qwen writes it, with what real templates use: the start token, tojson, raise_exception,
# loop controls and whitespace control
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}"
    "{% endif %}{% if m['role'] == 'system' %}<|im_start|>system\n{{ m['content'] }} {{ {'note': 'café'} | tojson }}"
    "<|im_end|>\n{% continue %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Où est 東京? 🚀 "},
            {"role": "assistant", "content": "Japan."}, {"role": "user", "content": "And Paris?"}]


def with_template(folder: Path, template: str) -> Path:
    """The template into the folder as transformers 5 saves it (beside tokenizer_config.json)."""
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    return folder


@pytest.fixture
def chat_folder(tmp_path) -> Path:
    return with_template(llama_folder(tmp_path / "m", byte_level_tokenizer(bos=True)), TEMPLATE)


def test_ids_equal_transformers_apply_chat_template(chat_folder):
    ours = PretrainedTokenizer.from_folder(chat_folder, 512)
    theirs = transformers.AutoTokenizer.from_pretrained(str(chat_folder))
    made = chat_prompt(ours, MESSAGES)
    expected = theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert render(TEMPLATE, MESSAGES, bos_token="<|begin_of_text|>") == expected
    assert made.prompt == theirs(expected, add_special_tokens=False).input_ids and made.stop == ()
    assert made.prompt[0] == ours.bos_id and made.prompt.count(ours.bos_id) == 1  # the template's, once
    assert '{"note": "café"}' in expected


def test_a_template_that_fails_is_one_line(chat_folder):
    ours = PretrainedTokenizer.from_folder(chat_folder, 512)
    with pytest.raises(PocketError, match=r"^the model's chat template failed: unknown role tool$"):
        chat_prompt(ours, [{"role": "tool", "content": "x"}])
    with pytest.raises(PocketError, match="^the model's chat template failed: .*"):
        render("{% for %}", MESSAGES)


def test_a_model_without_a_template_gets_the_transcript(tmp_path):
    ours = PretrainedTokenizer.from_folder(llama_folder(tmp_path / "m", byte_level_tokenizer(bos=True)), 512)
    assert ours.chat_template is None
    made = chat_prompt(ours, MESSAGES[1:2])
    assert made.prompt == transcript(MESSAGES[1:2]) == "user:  Où est 東京? 🚀 \nassistant:"
    assert made.stop == ("\nuser:",)


def test_the_cli_keeps_the_conversation(capsys, monkeypatch, chat_folder):
    """Three messages by the second turn: a template that refuses more than two shows it, in one line,
    and the chat goes on (the failed turn is not kept: the third turn has three messages again)."""
    with_template(chat_folder, "{% if messages | length > 2 %}{{ raise_exception('turn ' ~ (messages | length)) }}"
                               "{% endif %}" + TEMPLATE)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAgain\nOnce more\n"))
    code, out, err = run_cli(capsys, "chat", "--model", str(chat_folder), "--max-new-tokens", "3", "--seed", "1")
    assert code == 0, err
    assert err.count("error: the model's chat template failed: turn 3") == 2 and "Traceback" not in err


def test_the_servers_chat_renders_the_template(chat_folder):
    pytest.importorskip("fastapi")
    from test_serve import Served

    served = Served(chat_folder)
    try:
        import httpx

        body = {"model": "m", "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
        got = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=30).json()
        theirs = transformers.AutoTokenizer.from_pretrained(str(chat_folder))
        ids = theirs(theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False).input_ids
        assert got["usage"]["prompt_tokens"] == len(ids)
        bad = httpx.post(served.url + "/v1/chat/completions", timeout=30,
                         json={**body, "messages": [{"role": "system", "content": "{{"}, {"role": "user", "content": "x"}]})
        assert bad.status_code == 200  # content is data, never template code
    finally:
        served.close()


def test_the_server_answers_a_failing_template_with_a_400_and_serves_on(chat_folder):
    pytest.importorskip("fastapi")
    import httpx
    from test_serve import Served

    served = Served(with_template(chat_folder, "{% if messages[-1]['content'] == 'boom' %}"
                                               "{{ raise_exception('no boom') }}{% endif %}" + TEMPLATE))
    try:
        body = {"model": "m", "max_tokens": 2, "temperature": 0}
        bad = httpx.post(served.url + "/v1/chat/completions", timeout=30,
                         json={**body, "messages": [{"role": "user", "content": "boom"}]})
        assert bad.status_code == 400
        assert bad.json()["error"]["message"] == "the model's chat template failed: no boom"
        assert bad.json()["error"]["param"] == "messages"
        ok = httpx.post(served.url + "/v1/chat/completions", timeout=30,
                        json={**body, "messages": [{"role": "user", "content": "fine"}]})
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        served.close()


def test_system_reset_and_exit_in_the_cli(capsys, monkeypatch, chat_folder):
    """--system starts every conversation (a template that demands it refuses otherwise); /reset starts over
    (a template refusing more than 3 messages would fail the third turn without it); /exit ends."""
    with_template(chat_folder, "{% if messages[0]['role'] != 'system' %}{{ raise_exception('no system') }}{% endif %}"
                               "{% if messages | length > 3 %}{{ raise_exception('too long') }}{% endif %}" + TEMPLATE)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/reset\nAgain\n/exit\nNever read\n"))
    code, out, err = run_cli(capsys, "chat", "--model", str(chat_folder), "--max-new-tokens", "2", "--seed", "1",
                             "--system", "Be brief.")
    assert code == 0 and "error" not in err and out.count("(a new conversation)") == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    code, out, err = run_cli(capsys, "chat", "--model", str(chat_folder), "--max-new-tokens", "2")
    assert "error: the model's chat template failed: no system" in err


def test_a_long_conversation_loses_its_oldest_exchanges_whole(chat_folder):
    from pocketgpt.chat import fit_conversation

    tok = PretrainedTokenizer.from_folder(chat_folder, 512)
    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": r, "content": f"{r} number {k} " * 3} for k in range(6) for r in ("user", "assistant")]
    conversation = [system, *turns, {"role": "user", "content": "last"}]
    whole = len(chat_prompt(tok, conversation).prompt)
    kept, dropped = fit_conversation(tok, conversation, whole)
    assert (kept, dropped) == (conversation, 0)
    kept, dropped = fit_conversation(tok, conversation, whole - 1)
    assert kept == [system, *turns[2:], conversation[-1]] and dropped == 2  # one exchange, the oldest
    kept, dropped = fit_conversation(tok, conversation, 1)
    assert kept == [system, conversation[-1]] and dropped == 12  # never the system turn or the question
