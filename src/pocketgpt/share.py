"""`pocketgpt push`: a model onto the Hugging Face hub, as the folder `export --format hf` writes.

The folder is exported into a temporary directory (export_hf, so the hub gets exactly what export
writes), then one create_repo (private unless asked otherwise; an existing repo is kept) and one
upload_folder commit. A dry run stops after the export and lists the files: no token, no network.

The token comes from --token, else HF_TOKEN, else huggingface_hub's stored login (`hf auth login`).
Every failure the user can fix (no token, offline, no network, a refused token, a bad repo id) is one
line; huggingface_hub is imported only inside, since the core install does not have it.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PocketError
from .hf import EXPORT_FILES, HUB_NAME, export_hf, hub_offline

if TYPE_CHECKING:
    from .model import GPT
    from .tokenizer import Tokenizer

# The placeholder hf.model_card() writes where the card's code loads the model.
CARD_PLACEHOLDER = "PATH_OR_REPO"
MAX_REPO_ID = 96  # the hub's limit


@dataclass
class Upload:
    """What a push sent (or, for a dry run, would send)."""

    repo_id: str
    private: bool
    files: list[tuple[str, int]]  # (name, bytes), sorted by name
    url: str | None = None  # the repo's address; None for a dry run
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(n for _, n in self.files)


def check_repo_id(repo: str) -> None:
    """The hub's rules for a model repo id ("name" or "owner/name"), said in one line before any work."""
    bad = (not HUB_NAME.match(repo) or len(repo) > MAX_REPO_ID or "--" in repo or ".." in repo
           or repo.endswith((".git", ".", "-")))
    if bad:
        raise PocketError(f"--repo {repo!r} is not a Hugging Face repo id: use owner/name (letters, digits, - _ . ; "
                          f"at most {MAX_REPO_ID} characters, no -- or ..), e.g. yourname/tiny-shakespeare")


def find_token(explicit: str | None = None) -> str | None:
    """--token, else HF_TOKEN, else the login huggingface_hub stored; None when there is none."""
    if explicit:
        return explicit.strip()
    if os.environ.get("HF_TOKEN", "").strip():
        return os.environ["HF_TOKEN"].strip()
    try:
        from huggingface_hub import get_token
    except ImportError:
        return None
    return get_token()


def push(model: "GPT", tok: "Tokenizer", repo: str, *, private: bool = True, token: str | None = None,
         dry_run: bool = False, stats: dict[str, Any] | None = None, license: str = "other",
         message: str | None = None) -> Upload:
    """Export model as a Hugging Face folder and upload it to repo; a dry run only lists the files."""
    check_repo_id(repo)
    if not dry_run:
        token = _usable_token(token)
    with tempfile.TemporaryDirectory(prefix="pocketgpt-push-") as tmp:
        folder = Path(tmp) / repo.rpartition("/")[2]
        notes = export_hf(model, tok, folder, name=repo.rpartition("/")[2], stats=stats, license=license)
        _card_names_repo(folder, repo)
        files = sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file())
        result = Upload(repo, private, files, notes=notes)
        if not dry_run:
            result.url = _upload(folder, repo, private, token, message or f"Upload {repo.rpartition('/')[2]} "
                                                                         "with pocketgpt")
    return result


def _usable_token(token: str | None) -> str:
    if hub_offline():
        raise PocketError("cannot push: HF_HUB_OFFLINE is set; unset it to reach the hub (or use --dry-run to "
                          "see what would be uploaded)")
    try:
        importlib.import_module("huggingface_hub")
    except ImportError:
        raise PocketError("push needs huggingface_hub: pip install 'pocketgpt[hf]'") from None
    found = find_token(token)
    if not found:
        raise PocketError("no Hugging Face token: pass --token, set HF_TOKEN, or log in once with `hf auth login` "
                          "(a token with write access, from huggingface.co/settings/tokens)")
    return found


def _card_names_repo(folder: Path, repo: str) -> None:
    """The card's example code loads this very repo, not a placeholder."""
    from .files import atomic_write_text

    card = folder / "README.md"
    if card.is_file():
        atomic_write_text(card, card.read_text(encoding="utf-8").replace(CARD_PLACEHOLDER, repo))


def _upload(folder: Path, repo: str, private: bool, token: str, message: str) -> str:
    import huggingface_hub

    api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        repo_id = getattr(url, "repo_id", None) or repo  # a bare name lands under the token's user
        # An export file of an earlier push that this one lacks (say, another tokenizer's) is removed in
        # the same commit, so the repo never pairs this model with a stale file; other files are kept.
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=message,
                          delete_patterns=list(EXPORT_FILES))
    except _network_errors() as e:
        raise _reworded(e, repo) from None
    return str(url)


def _network_errors() -> tuple[type[BaseException], ...]:
    """What the hub client raises when the server refuses or the network fails. Its HTTP errors are
    OSErrors in every version (and requests' are too); httpx's, which newer versions use, are not."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _reworded(e: BaseException, repo: str) -> PocketError:
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None) if response is not None else None
    if status == 401:
        return PocketError("the hub refused the token (401 unauthorized): check --token / HF_TOKEN, or log in again "
                           "with `hf auth login`")
    if status == 403:
        return PocketError(f"this token may not write to {repo} (403 forbidden): use a token with write access, "
                           "and a repo under your own name or an organization you belong to")
    if isinstance(status, int):
        return PocketError(f"the hub refused the push to {repo} (HTTP {status}): {_first_line(e)}")
    return PocketError(f"cannot reach the Hugging Face hub ({type(e).__name__}: {_first_line(e)}); check the network, "
                       "or use --dry-run to see what would be uploaded")


def human_size(n: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the hub shows sizes)."""
    if n < 1000:
        return f"{n} B"
    size = n / 1000
    for unit in ("kB", "MB"):
        if size < 1000:
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
