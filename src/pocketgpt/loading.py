"""load(SRC): a trained model, ready to sample from or score text with, for notebooks and the CLI."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator

import torch

from .checkpoint import load_weights, read_weights_metadata
from .config import TrainConfig
from .engine import Engine
from .errors import PocketError
from .model import GPT
from .runtime import resolve
from .tokenizer import StreamDecoder, Tokenizer, load_tokenizer

CHECKPOINTS = ("best", "last")


def weights_path(run_dir: Path, checkpoint: str) -> Path:
    if checkpoint not in CHECKPOINTS:
        raise PocketError(f"--checkpoint must be 'best' or 'last', got '{checkpoint}'")
    if checkpoint == "best":
        path = run_dir / "model.safetensors"
        if not path.is_file():
            raise PocketError(f"{run_dir} has no best checkpoint yet (no eval finished); try --checkpoint last")
        return path
    from .checkpoint import resume_dir

    d = resume_dir(run_dir)
    if d is None:
        raise PocketError(f"{run_dir} has no last/ checkpoint; try --checkpoint best")
    return d / "model.safetensors"


class LoadedModel:
    """A model with its tokenizer: .generate(text) -> text, .logits(ids) -> (len(ids), V) float32."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, config: TrainConfig, source: Path, info: dict[str, str]):
        self.model, self.tokenizer, self.config, self.source, self.info = model, tokenizer, config, source, info
        self.engine = Engine(model)

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 200,
        num_samples: int = 1,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[list[str]]:
        """Yield, per generated token, the new text of each sample (pieces may be empty).

        The prompt is checked before anything is yielded, so a bad prompt fails before output starts.
        """
        ids = self.tokenizer.encode(prompt)
        steps = self.engine.stream(ids, max_new_tokens, num_samples, temperature, top_k, top_p, seed)
        first = next(steps, None)  # runs the engine's checks and the prefill now
        decoders = [StreamDecoder(self.tokenizer) for _ in range(num_samples)]

        def pieces() -> Iterator[list[str]]:
            if first is None:
                return
            for step in itertools.chain([first], steps):
                yield [d.push(int(t)) for d, t in zip(decoders, step)]

        return pieces()

    def generate(self, prompt: str, max_new_tokens: int = 200, **kwargs) -> str:
        """The prompt followed by its continuation (the first sample when num_samples > 1)."""
        return self.generate_many(prompt, max_new_tokens, **kwargs)[0]

    def generate_many(self, prompt: str, max_new_tokens: int = 200, **kwargs) -> list[str]:
        """num_samples texts, generated as one batch, each the prompt plus its continuation."""
        ids = self.tokenizer.encode(prompt)
        outs = self.engine.generate(ids, max_new_tokens, **kwargs)
        return [prompt + self.tokenizer.decode(o) for o in outs]

    @torch.inference_mode()
    def logits(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Next-token logits at every position: (len(ids), vocab_size), float32, on CPU."""
        idx = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        if idx.size(1) == 0 or idx.size(1) > self.block_size:
            raise PocketError(f"logits() takes 1 to {self.block_size} ids, got {idx.size(1)}")
        if int(idx.min()) < 0 or int(idx.max()) >= self.model.config.vocab_size:
            raise PocketError(f"token ids must be in [0, {self.model.config.vocab_size})")
        device = next(self.model.parameters()).device
        out, _ = self.model(idx.to(device))
        return out[0].float().cpu()


def load(src: str | Path, checkpoint: str = "best", device: str = "cpu") -> LoadedModel:
    """Load a run folder (the --out of `pocketgpt train`)."""
    from .trainer import read_run_config

    run_dir = Path(src)
    if not run_dir.exists():
        raise PocketError(f"model not found: {run_dir}")
    if not (run_dir / "config.json").is_file():
        raise PocketError(f"{run_dir} is not a pocketgpt run folder (no config.json); give the --out folder of a training run")
    cfg, _ = read_run_config(run_dir)
    if cfg.model.vocab_size <= 0:
        raise PocketError(f"{run_dir / 'config.json'} has no vocab_size; the run did not start properly")
    tok = load_tokenizer(run_dir / "tokenizer.json")
    if tok.vocab_size != cfg.model.vocab_size:
        raise PocketError(f"tokenizer.json has {tok.vocab_size} tokens but the model expects {cfg.model.vocab_size}")
    path = weights_path(run_dir, checkpoint)
    model = GPT(cfg.model)
    load_weights(model, path)
    info = read_weights_metadata(path)
    model.to(resolve(device, "float32").device).eval()
    return LoadedModel(model, tok, cfg, run_dir, info)
