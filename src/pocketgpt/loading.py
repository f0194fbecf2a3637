"""load(SRC): a trained model, ready to sample from or score text with, for notebooks and the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Union

import torch

from .checkpoint import WEIGHTS, load_weights, read_weights_metadata
from .config import TrainConfig
from .engine import DecodeBatch, Engine, TokenStream
from .errors import PocketError
from .model import GPT
from .rundir import BEST_WEIGHTS
from .runtime import resolve
from .sampling import Chunk, Completion, SamplingSettings, TextStream, as_settings
from .tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from .hf import Imported

CHECKPOINTS = ("best", "last")


def weights_path(run_dir: Path, checkpoint: str) -> Path:
    if checkpoint not in CHECKPOINTS:
        raise PocketError(f"--checkpoint must be 'best' or 'last', got '{checkpoint}'")
    if checkpoint == "best":
        path = run_dir / BEST_WEIGHTS
        if not path.is_file():
            raise PocketError(f"{run_dir} has no best checkpoint yet (no eval finished); try --checkpoint last")
        return path
    from .checkpoint import resume_dir

    d = resume_dir(run_dir)
    if d is None:
        raise PocketError(f"{run_dir} has no last/ checkpoint; try --checkpoint best")
    return d / WEIGHTS


# A prompt: text, encoded with the tokenizer (and its start token), or ids fed as they are (a rendered
# chat template, chat.chat_prompt)
Prompt = Union[str, list[int]]


class LoadedModel:
    """A model with its tokenizer: text in, text out; .logits(ids) -> (len(ids), V) float32.

    Generation takes one sampling.SamplingSettings, or max_new_tokens and the settings as keywords
    (sampling.as_settings: short calls from a notebook; keywords also change a given
    SamplingSettings). Three views of one generation, all built on sampling.TextStream over the
    engine's TokenStream:

    - complete(prompt, settings) -> [Completion(text, finish_reason, prompt_tokens, completion_tokens)]
      (text: the continuation only, without the prompt or a stop string);
    - stream_chunks(prompt, settings) -> Chunk records as text comes, each sample ending with one
      that carries its finish_reason and token counts (what a server streams);
    - stream(prompt, settings) -> per step a list of new text per sample (the CLI's loop), and
      generate / generate_many -> the prompt followed by each continuation.

    Many generations stepped together (a server's): batch() -> a TextBatch.

    Stop strings end a sample and are never output; stop_at_eos ends one at the tokenizer's
    end-of-text token (gpt2 and bpe kinds); char tokenizers have none, so there it changes nothing.
    Every view checks the settings and the prompt and runs the prefill when called, before the
    first piece is asked for: a bad prompt fails before any output starts.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, config: TrainConfig, source: Path, info: dict[str, str]):
        self.model, self.tokenizer, self.config, self.source, self.info = model, tokenizer, config, source, info
        self.engine = Engine(model)

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def text_stream(self, prompt: Prompt, settings: SamplingSettings | int | None = None,
                    num_samples: int | None = None, **changes: Any) -> TextStream:
        """The generation's text layer, prefilled and ready to iterate (see the class docstring)."""
        resolved = as_settings(settings, num_samples=num_samples, **changes)
        tokens = _start_tokens(self.tokenizer, self.engine.start, prompt, resolved)
        return TextStream(tokens, self.tokenizer, resolved.stop)

    def batch(self) -> TextBatch:
        """An empty TextBatch: many generations of this model stepped together (a server's)."""
        return TextBatch(self.tokenizer, DecodeBatch(self.engine))

    def stream(self, prompt: str, settings: SamplingSettings | int | None = None, num_samples: int | None = None,
               **changes: Any) -> Iterator[list[str]]:
        """Yield, per generated token, the new text of each sample (pieces may be empty)."""
        return iter(self.text_stream(prompt, settings, num_samples, **changes))

    def stream_chunks(self, prompt: str, settings: SamplingSettings | int | None = None,
                      **changes: Any) -> Iterator[Chunk]:
        """Chunk records as text comes; each sample's last one has finish_reason and token counts."""
        return self.text_stream(prompt, settings, **changes).chunks()

    def complete(self, prompt: str, settings: SamplingSettings | int | None = None,
                 on_step: Callable[[], None] | None = None, **changes: Any) -> list[Completion]:
        """One Completion per sample, generated as one batch; on_step() after each step (progress)."""
        return self.text_stream(prompt, settings, **changes).completions(on_step)

    def generate(self, prompt: str, settings: SamplingSettings | int | None = None, **changes: Any) -> str:
        """The prompt followed by its continuation (the first sample when num_samples > 1)."""
        return self.generate_many(prompt, settings, **changes)[0]

    def generate_many(self, prompt: str, settings: SamplingSettings | int | None = None,
                      on_step: Callable[[], None] | None = None, **changes: Any) -> list[str]:
        """num_samples texts, generated as one batch, each the prompt plus its continuation."""
        return [prompt + c.text for c in self.complete(prompt, settings, on_step, **changes)]

    def chat(self, messages: list[dict[str, str]], settings: SamplingSettings | int | None = None,
             **changes: Any) -> str:
        """The reply to a conversation ([{"role", "content"}, ...]), through the model's chat template (or the
        transcript for a model without one); it ends at the end of the turn."""
        return "".join(self.chat_stream(messages, settings, **changes))

    def chat_stream(self, messages: list[dict[str, str]], settings: SamplingSettings | int | None = None,
                    **changes: Any) -> Iterator[str]:
        """The reply to a conversation, piece by piece as it is generated."""
        from .chat import chat_prompt

        made = chat_prompt(self.tokenizer, messages)
        resolved = as_settings(settings, **changes)
        stream = self.text_stream(made.prompt, resolved.replace(stop=resolved.stop + made.stop, num_samples=1))
        return (pieces[0] for pieces in stream if pieces[0])

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


def _start_tokens(tokenizer: Tokenizer, start: Callable[..., TokenStream], prompt: Prompt,
                  settings: SamplingSettings) -> TokenStream:
    """prompt's generation, started by start (Engine.start, or DecodeBatch.start to join a batch)."""
    ids = prompt_ids(tokenizer, prompt) if isinstance(prompt, str) else _checked_ids(prompt, tokenizer.vocab_size)
    # a pretrained model's own tokenizer always ends at its end of sequence, as transformers' generate does
    # and a model fine-tuned on conversations with pocketgpt's turn tokens at the end of its turn
    stops = settings.stop_at_eos or tokenizer.kind == "hf" or hasattr(tokenizer, "chat_tokens")
    return start(ids, settings, end_ids(tokenizer) if stops else [])


def _checked_ids(ids: list[int], vocab_size: int) -> list[int]:
    if not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
        raise PocketError(f"prompt token ids must be integers in [0, {vocab_size})")
    return list(ids)


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """A prompt's ids: a pretrained model's tokenizer puts its own start (a BOS token) before them."""
    encode_prompt = getattr(tokenizer, "encode_prompt", None)  # the hf kind's
    return encode_prompt(prompt) if encode_prompt is not None else tokenizer.encode(prompt)


def end_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids that end a generation: a pretrained model's end-of-sequence ids (often several), the
    byte-level kinds' <|endoftext|>; a char tokenizer has none."""
    ids = getattr(tokenizer, "stop_ids", None)
    if ids is not None:
        return list(ids)
    eot = getattr(tokenizer, "eot_id", None)
    return [eot] if eot is not None else []


@dataclass(eq=False)
class Generation:
    """One prompt's generation in a TextBatch: the handle add() returns and step() reports on."""

    text: TextStream
    tokens: TokenStream

    @property
    def generated(self) -> int:
        """Tokens generated so far, every sample's (each stop token included)."""
        return sum(self.tokens.completion_tokens)


@dataclass(frozen=True)
class Progress:
    """What one step gave one generation: its new chunks (maybe none: text held back), whether it
    has ended (its last chunks are among these; its rows are given back), and the error that ended
    it, if its text layer failed."""

    generation: Generation
    chunks: list[Chunk]
    ended: bool
    error: Exception | None = None


class TextBatch:
    """Many generations of one model stepped together, text in and text out (a server's).

    add(prompt, settings) starts one: the prompt is checked now (a PocketError names what is wrong)
    and prefilled in the next step's forward. step() runs one forward for every generation (an
    engine.DecodeBatch: one KV cache, each row at its own position), draws every generation's next
    ids (one sampling pass per group of equal settings), and returns each one's chunks. close(g)
    ends one early (its client left). Each generation's text is what it would be alone, with the
    same seed. Not thread-safe: one thread owns a batch.
    """

    def __init__(self, tokenizer: Tokenizer, tokens: DecodeBatch):
        self._tokenizer, self._tokens = tokenizer, tokens
        self._live: list[Generation] = []
        self.rows_fed = 0  # rows the last step's forward fed (each sample's token or window)

    def add(self, prompt: Prompt, settings: SamplingSettings) -> Generation:
        tokens = _start_tokens(self._tokenizer, self._tokens.start, prompt, settings)
        generation = Generation(TextStream(tokens, self._tokenizer, settings.stop), tokens)
        self._live.append(generation)
        return generation

    def step(self) -> list[Progress]:
        """One step of every generation. A failed forward raises (the caller ends every generation
        of the batch); a generation whose text layer fails ends alone, with the error in its Progress."""
        self.rows_fed = self._tokens.advance()
        self._tokens.pick([g.tokens for g in self._live])
        return [self._progress(g) for g in list(self._live)]

    def _progress(self, g: Generation) -> Progress:
        try:
            chunks = g.text.next_chunks()
            if chunks is not None and g.tokens.done:  # the last step: its final chunks come now
                chunks = chunks + (g.text.next_chunks() or [])
                ended = True
            else:
                ended = chunks is None
        except Exception as e:  # noqa: BLE001 - ends this generation only
            self.close(g)
            return Progress(g, [], True, e)
        if ended:
            self.close(g)
        return Progress(g, chunks or [], ended)

    def close(self, g: Generation) -> None:
        """End a generation now and give its rows back (nothing if it has ended already)."""
        if g in self._live:
            self._live.remove(g)
            g.tokens.close()


def load_foreign(src: str | Path, kind: str, vocab: str | Path | None = None,
                 keep_bfloat16: bool = False) -> "Imported":
    """Load a source of a kind hf.source_kind() named; vocab (a nanoGPT char vocabulary) for nanoGPT only;
    keep_bfloat16: a Hugging Face model's bfloat16 matrices stay so (hf.load_hf_folder)."""
    from . import hf, nanogpt

    if vocab is not None and kind != "nanogpt":
        raise PocketError("--vocab is for nanoGPT checkpoints (a meta.pkl or the text it was prepared from); "
                          f"{src} carries its own tokenizer")
    if kind == "huggingface":
        return hf.load_hf_folder(src, keep_bfloat16=keep_bfloat16)
    if kind == "nanogpt":
        return nanogpt.load_nanogpt(src, vocab)
    if kind == "hub":
        return hf.load_hub(str(src), keep_bfloat16)
    raise ValueError(kind)


def load(src: str | Path, checkpoint: str = "best", device: str = "cpu", vocab: str | Path | None = None) -> LoadedModel:
    """Load a run folder (the --out of `pocketgpt train`), a Hugging Face folder or hub name, or a
    nanoGPT checkpoint (ckpt.pt or its out_dir). Foreign models have one set of weights: checkpoint is ignored.
    vocab: a nanoGPT char checkpoint's meta.pkl, or the text it was prepared from, when not beside ckpt.pt."""
    from . import rundir

    if not rundir.is_run_dir(src):
        from .hf import source_kind

        kind = source_kind(src)
        if kind is not None:
            got = load_foreign(src, kind, vocab)
            got.model.to(resolve(device, "float32").device).eval()
            return LoadedModel(got.model, got.tokenizer, TrainConfig(model=got.model.config), got.source, got.info)
    run_dir = rundir.check_is_run(src)
    if vocab is not None:
        raise PocketError(f"--vocab is for nanoGPT checkpoints; {run_dir} is a pocketgpt run with its own tokenizer")
    cfg, _ = rundir.read_config(run_dir)
    if cfg.model.vocab_size <= 0:
        raise PocketError(f"{run_dir / rundir.CONFIG} has no vocab_size; the run did not start properly")
    tok = load_tokenizer(run_dir / rundir.TOKENIZER)
    if tok.vocab_size != cfg.model.vocab_size:
        raise PocketError(f"{rundir.TOKENIZER} has {tok.vocab_size} tokens but the model expects {cfg.model.vocab_size}")
    path = weights_path(run_dir, checkpoint)
    if cfg.lora.enabled and checkpoint == "last":  # last/ holds the frozen base and the adapters: merge them
        from .lora import load_merged

        model = load_merged(cfg.model, cfg.lora, path)
    else:  # best weights, a LoRA run's already merged
        model = GPT(cfg.model)
        load_weights(model, path)
    info = read_weights_metadata(path)
    model.to(resolve(device, "float32").device).eval()
    return LoadedModel(model, tok, cfg, run_dir, info)
