"""`pocketgpt push` (share.py): the dry run, the token, the errors, and the upload with HfApi replaced by a fake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from helpers import run_cli, untrained_run  # noqa: E402

from pocketgpt import share  # noqa: E402
from pocketgpt.hf import state_to_hf  # noqa: E402
from pocketgpt.loading import load  # noqa: E402
from pocketgpt.tokenizer import train_bpe  # noqa: E402

REPO = "someone/tiny-bpe"
EXPECTED = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md"}


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records the calls and what the folder held at upload time."""

    instances: list["FakeApi"] = []
    fail_with: BaseException | None = None

    def __init__(self, token=None, **kwargs):
        self.token = token
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        FakeApi.instances.append(self)

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if FakeApi.fail_with is not None:
            raise FakeApi.fail_with
        return huggingface_hub.hf_api.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])  # a temporary folder: read it now, it is gone afterwards
        self.uploaded = {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """HfApi replaced, no token anywhere (environment or stored login), online."""
    FakeApi.instances, FakeApi.fail_with = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    return FakeApi


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_text) -> Path:
    return untrained_run(tmp_path_factory.mktemp("push"), train_bpe([corpus_text[:20_000]], 300), bias=True)


def push(capsys, run: Path, *extra) -> tuple[int, str, str]:
    return run_cli(capsys, "push", "--model", run, "--repo", REPO, *extra)


def test_dry_run_lists_files_without_token_or_network(capsys, fake_hub, run):
    code, out, err = push(capsys, run, "--dry-run")
    assert code == 0, err
    assert f"would upload to {REPO} (private if created): {len(EXPECTED)} files" in out
    listed = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert set(listed) == EXPECTED
    size, unit = listed["model.safetensors"]
    assert unit in ("kB", "MB") and float(size) > 0
    assert fake_hub.instances == []  # no client, so no network
    code, out, _ = push(capsys, run, "--dry-run", "--public")
    assert "(public if created)" in out


def test_missing_token_is_one_line(capsys, fake_hub, run):
    code, _, err = push(capsys, run)
    assert code == 2 and err.count("\n") == 1
    assert "no Hugging Face token" in err and "--token" in err and "HF_TOKEN" in err and "hf auth login" in err
    assert fake_hub.instances == []


def test_push_uploads_the_export_folder(capsys, fake_hub, run, monkeypatch):
    from safetensors.torch import load as load_safetensors

    monkeypatch.setenv("HF_TOKEN", "hf_from_environment")
    code, out, err = push(capsys, run, "--token", "hf_given")
    assert code == 0, err
    assert f"uploaded to https://huggingface.co/{REPO}" in out
    (api,) = fake_hub.instances
    assert api.token == "hf_given"  # --token wins over HF_TOKEN
    (name, create), (name2, upload) = api.calls
    assert (name, name2) == ("create_repo", "upload_folder")
    assert create["repo_id"] == REPO and create["private"] is True and create["exist_ok"] is True
    assert upload["repo_id"] == REPO and "model.safetensors" in upload["delete_patterns"]
    assert set(api.uploaded) == EXPECTED
    lm = load(run)
    config = json.loads(api.uploaded["config.json"])
    assert (config["model_type"], config["n_layer"], config["n_embd"], config["vocab_size"]) == (
        "gpt2", lm.model.config.n_layer, lm.model.config.n_embd, lm.tokenizer.vocab_size)
    weights = load_safetensors(api.uploaded["model.safetensors"])
    want = state_to_hf(lm.model)
    assert set(weights) == set(want) and all((weights[k] == want[k]).all() for k in want)
    assert json.loads(api.uploaded["tokenizer.json"]) == lm.tokenizer.to_dict()["tokenizer"]
    card = api.uploaded["README.md"].decode()
    assert card.startswith("---\nlicense: other") and "# tiny-bpe" in card
    assert f'from_pretrained("{REPO}")' in card and share.CARD_PLACEHOLDER not in card


def test_token_from_environment_then_stored_login_and_public(capsys, fake_hub, run, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_from_environment")
    assert push(capsys, run, "--public")[0] == 0
    assert fake_hub.instances[-1].token == "hf_from_environment"
    assert fake_hub.instances[-1].calls[0][1]["private"] is False
    monkeypatch.delenv("HF_TOKEN")
    stored = Path(huggingface_hub.constants.HF_TOKEN_PATH)
    stored.parent.mkdir(parents=True)
    stored.write_text("hf_stored_login\n")
    assert push(capsys, run)[0] == 0
    assert fake_hub.instances[-1].token == "hf_stored_login"


def _http_error(status: int) -> BaseException:
    import httpx2

    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return huggingface_hub.errors.HfHubHTTPError(f"{status} Client Error", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize("error, words", [
    (lambda: _http_error(401), "refused the token (401"),
    (lambda: _http_error(403), "may not write to someone/tiny-bpe (403"),
    (lambda: _http_error(500), "refused the push to someone/tiny-bpe (HTTP 500)"),
    (lambda: ConnectionError("Failed to resolve 'huggingface.co'"), "cannot reach the Hugging Face hub"),
    (lambda: __import__("httpx2").ConnectError("[Errno -3] Temporary failure"), "cannot reach the Hugging Face hub"),
])
def test_hub_and_network_errors_are_one_line(capsys, fake_hub, run, error, words):
    pytest.importorskip("httpx2")
    fake_hub.fail_with = error()
    code, _, err = push(capsys, run, "--token", "hf_x")
    assert code == 2 and err.count("\n") == 1 and words in err, err


def test_offline_and_bad_repo_ids(capsys, fake_hub, run, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = push(capsys, run, "--token", "hf_x")
    assert code == 2 and "HF_HUB_OFFLINE" in err and "--dry-run" in err
    assert fake_hub.instances == []
    for bad in ("a/b/c", "someone/bad--name", "-x/y", "someone/name.git", "", "x" * 97):
        code, _, err = run_cli(capsys, "push", "--model", "no-such-model", f"--repo={bad}", "--dry-run")
        assert code == 2 and err.count("\n") == 1 and "not a Hugging Face repo id" in err, bad


def test_human_size():
    assert [share.human_size(n) for n in (0, 999, 1000, 1_234_567, 5 * 10**9)] == [
        "0 B", "999 B", "1.0 kB", "1.2 MB", "5.0 GB"]
