"""Generation: sampling, streams and batches over the decoder (decoder.py); speaks token ids only.

Sampling settings come as one sampling.SamplingSettings. `Engine.start` returns a TokenStream:
next() gives one new id per sample, None once that sample has ended (at a stop token id, which is
not given out, or at max_new_tokens; the text layer above ends samples at stop strings with
stop(row)); finish_reasons and completion_tokens say why and after how many tokens. Finished rows
keep riding in the batch (their ids are dropped); the loop ends when every row has finished.
Engine.generate takes the settings as one SamplingSettings or as max_new_tokens and keywords
(sampling.as_settings), for notebook calls.

Every generation's samples are rows of a `DecodeBatch`: one KV cache whose rows may belong to
several generations, each at its own position. The batch owns a public `Rows` record per
generation (its rows, cache view, window, the ids or window the model reads next, its logits, the
ids drawn ahead); the TokenStream holds only the sampling state (settings, generator, the
repetition penalty's seen-mask, counts, finish reasons). A generation alone is a batch of one
(Engine.start). Before each draw a stream asks its batch to feed its rows, which does nothing when
the batch's shared step has fed them already: a server's batch (DecodeBatch.start) runs advance(),
which feeds every generation's last ids through the model in one forward (Decoder.step_rows, a
mask hiding each row's empty slots), and pick(streams), which draws their next ids per group of
equal settings, each stream with its own generator. Windows that must be prefilled (a new prompt,
a slid window) ride in that same forward as extra rows of its matmuls: at 16 streams a step is a
chain of small matmuls, and a separate prefill per stream cost about as much as the step itself.
A stream's ids do not depend on its neighbours: they are what Engine.start gives it alone
(tests/test_batch.py).

Threads: the engine's own work runs on decode_threads' count (one on a 2-core CPU), set inside
each start() / next() call and the caller's put back before it returns (about 1 us a step), so
nothing is held across a yield: interleaved generations and the caller's own torch work each see
their own setting. (A worker thread would keep an OpenMP count of its own, but setting it changes
torch's default for every thread started later, and handing each token across threads costs ~25 us.)

When the context window is full, the window slides: the cache is rebuilt from the newest
block_size // 2 tokens (one prefill) and decoding continues. Learned absolute positions make a
rolling cache inexact (every cached key would need a new position), so the rebuild keeps exactness;
it costs one prefill per block_size // 2 tokens (in a batch: block_size // 2 extra rows in one step).

The cache has room for what a generation uses, never the model's whole declared context (28 layers
of 8 key/value heads declaring 40,960 positions: 9 GB of keys and values per sample). A generation
alone knows its length: its prompt plus max_new_tokens, capped at the context (past it, the window
slides as above). A shared batch does not (rows join, leave, stop early): it doubles its room when
a row needs more. Where the keys sit in memory changes no logit (tests/test_engine.py: bit for bit).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Collection, Sequence

import torch

from .decoder import DECODE_DTYPES, MANY_ROWS, Decoder, build_decoder
from .errors import PocketError
from .model import GPT, KVCache
from .sampling import SamplingSettings, as_settings

if TYPE_CHECKING:
    from .cpuload import LoadWatch

# Below this many parameters a CPU decode step is a chain of tiny matmuls where waking a second
# thread costs more than it saves (bench/RESULTS.md, "Generation").
SINGLE_THREAD_PARAMS = 5_000_000


def pick_next(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy; top-k keeps exactly k tokens.
    u: the uniform draws (uniforms()), when the caller drew them from several generators."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    return sample(distribution(logits, temperature, top_k, top_p), generator, u)


def distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """float32 logits (B, V) -> the probabilities pick_next draws from (B, V), rows need not sum to 1.
    Every operation is per row, so rows batched together get what each gets alone."""
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        # keep the k best by index, so ties at the k-th value cannot let more than k through
        values, indices = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:  # only then is a sort needed
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly better tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the best token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (as Hugging Face's): for every id already in the text (seen, a (B, V)
    presence mask), a positive logit is divided by penalty and a negative one multiplied by it, so
    penalty > 1 always makes a seen token less likely. Whole-row tensor ops: no loop over the vocabulary."""
    logits = logits.float()
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def uniforms(rows: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The (rows, 1) float64 draws sample() makes: drawn apart per generator, used together."""
    return torch.rand(rows, 1, generator=generator, dtype=torch.float64, device=device)


def sample(probs: torch.Tensor, generator: torch.Generator | None, u: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row of probs (B, V), which need not sum to 1 -> ids (B,); zero-mass ids never come.

    Inverse-CDF sampling: the first id whose running mass exceeds a uniform draw. Same distribution
    as torch.multinomial, one random number per row, and 17x faster at a 50k vocabulary (76 us vs
    1.3 ms a token, which was 7% of a GPT-2-small decode step). The running sum is float64 so
    rounding cannot shift any id's probability noticeably.
    """
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    u = uniforms(probs.size(0), generator, probs.device) if u is None else u
    ids = torch.searchsorted(cdf, u.mul_(cdf[:, -1:]), right=True)
    return ids.squeeze(-1).clamp_(max=probs.size(-1) - 1)  # u * total can round up to total itself


def decode_threads(model: GPT) -> int | None:
    """Threads for generating on a CPU where the count cannot follow the load (no /proc, or a count
    asked for): one for small models or on a two-core machine, else torch's default (load_threads
    is what an Engine uses where it can read the load).

    A small model's step is tiny ops where a second thread costs more than it saves. On a 2-core
    machine two OpenMP threads fall far behind as soon as another process wants a core. Measured
    on this 2-core EPYC (Zen 4), 1 vs 2 threads, medians of 9 interleaved runs: quiet, 0.8M params
    1.01x, 10.7M float16 steps 0.66x (there two threads win), 10.7M float32 0.99x; beside one
    busy-loop process 3.05x, 2.19x, 3.04x; on the shared machine under load ~4, 8.7x (0.8M) and
    4.9x (10.7M); GPT-2-small earlier 18 vs 3 tok/s. One thread is never much slower and often far
    faster. With more cores a single thread may not saturate memory bandwidth, so torch's default stays.
    """
    if model.num_params() < SINGLE_THREAD_PARAMS or torch.get_num_threads() <= 2:
        return 1
    return None


class LoadThreads:
    """An Engine's thread count for a model big enough to gain from more threads: torch's count while the
    machine is quiet, fewer while other programs keep cores busy (cpuload.LoadWatch, read at most every
    1.5 s at a step boundary). On a quiet 2-core Intel Xeon, two threads decoded a 0.6B-parameter model
    1.8x faster than one; beside one busy program two lose 2-3x (decode_threads). The count only changes
    the order floats are summed in (a sampled token may differ where two are within rounding)."""

    def __init__(self, ceiling: int, watch: "LoadWatch"):
        self.ceiling, self.watch, self.count = ceiling, watch, ceiling

    def now(self) -> int:
        change = self.watch.check(self.count, self.ceiling)
        if change is not None:
            self.count = change[0]
        return self.count


def load_threads(model: GPT, device: torch.device) -> LoadThreads | None:
    """The Engine's LoadThreads, or None where its count stays fixed (decode_threads): not a CPU, a small
    model, one thread, POCKETGPT_THREADS set (the user's number), or no /proc."""
    from .cpuload import LoadWatch, my_cpus
    from .distributed import ENV_THREADS

    ceiling = torch.get_num_threads()
    if device.type != "cpu" or model.num_params() < SINGLE_THREAD_PARAMS or ceiling < 2 or os.environ.get(ENV_THREADS):
        return None
    watch = LoadWatch(len(my_cpus()))
    return LoadThreads(ceiling, watch) if watch.working else None


class _Scoped:
    """Inference mode and the engine's thread count for one piece of the engine's own work.

    torch.set_num_threads sets the calling thread's OpenMP count (and torch's default for threads
    not started yet), so it is set on entry and the caller's value put back on exit, never held
    across a yield. Setting it costs ~0.1 us. A class, not @contextmanager: this runs once a token.
    """

    __slots__ = ("threads", "before", "mode")

    def __init__(self, threads: int | None):
        self.threads, self.before, self.mode = threads, None, torch.inference_mode()

    def __enter__(self) -> None:
        self.mode.__enter__()
        n = torch.get_num_threads()
        if self.threads is not None and n != self.threads:
            self.before = n
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        if self.before is not None:
            torch.set_num_threads(self.before)
            self.before = None
        self.mode.__exit__(*exc)


def check_prompt(prompt_ids: list[int], block_size: int) -> None:
    if not prompt_ids:
        raise PocketError("the prompt is empty; give at least one character or token")
    if len(prompt_ids) > block_size:
        raise PocketError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context is {block_size}; "
            f"shorten it to at most {block_size} tokens"
        )


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row: the chosen id's log-probability under the model's distribution (the logits before
    temperature, top-k, top-p and penalties, as OpenAI reports them) and the top most likely ids."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    picked = lp.gather(1, chosen[:, None]).squeeze(1).tolist()
    if top <= 0:
        return [(p, []) for p in picked]
    values, ids = lp.topk(min(top, lp.size(-1)), dim=-1)
    return [(p, list(zip(i, v))) for p, i, v in zip(picked, ids.tolist(), values.tolist())]


@dataclass(eq=False)
class Rows:
    """One generation's rows in a DecodeBatch: a record the batch owns (compared by identity).

    The batch writes where the rows are and what the model gave them; the generation's TokenStream
    writes `last` (the ids it drew, for the model to read; None once it has ended) and takes
    `picked`.
    """

    first: int  # its first row of the batch's cache; rows stay packed in join order
    count: int  # its rows: one per sample
    cache: KVCache  # a view over its rows at the generation's own position
    window: list[torch.Tensor]  # the context as (count,) columns: what a slid cache is rebuilt from
    fill: torch.Tensor | None  # (count, L) ids to prefill before the next step: a prompt, or a slid window
    last: torch.Tensor | None = None  # ids drawn that the model has not read yet
    logits: torch.Tensor | None = None  # (count, V) float32: the model's logits for the next ids
    picked: torch.Tensor | None = None  # next ids drawn ahead by DecodeBatch.pick

    @property
    def due(self) -> bool:
        """The model has ids of these rows to read (or a window to fill) before their next draw."""
        return self.last is not None or self.fill is not None


class TokenStream:
    """One generation's new token ids, a step per next(): a list with one id per sample, None for
    a sample that has ended (see the module docstring). Made by DecodeBatch.start (Engine.start:
    a batch of its own), which checks the prompt and runs the prefill or leaves it to the batch's
    next forward. Every step runs under the engine's own thread count, put back before next()
    returns. Its samples are `rows` of its batch's KV cache, with their own position, and it draws
    from its own random generator, so its output does not depend on its neighbours.

    prompt_tokens, completion_tokens[row] (ids generated for the row, the one that ended it
    included) and finish_reasons[row] ("stop", "length", None while running) are kept up to date.
    With settings.logprobs set, last_logprobs holds, after each step, per sample the chosen id's
    log-probability and the settings.logprobs most likely (id, log-probability) pairs.
    """

    def __init__(self, batch: DecodeBatch, rows: Rows, prompt: torch.Tensor, settings: SamplingSettings,
                 stop_token_ids: Collection[int] = ()):
        """Called by the batch inside its thread scope (inference mode); prompt: the (L,) ids on its device."""
        n = settings.num_samples
        self.batch, self.rows, self.settings = batch, rows, settings
        self.prompt_tokens = prompt.size(0)
        self.completion_tokens = [0] * n
        self.finish_reasons: list[str | None] = [None if settings.max_new_tokens else "length"] * n
        self.last_logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self._stop_ids = frozenset(stop_token_ids)
        self._running, self._steps = n if settings.max_new_tokens else 0, 0
        self._gen = torch.Generator(device=prompt.device)
        self._gen.manual_seed(settings.seed) if settings.seed is not None else self._gen.seed()
        # its uniform draws, taken from _gen a block at a time (on the CPU the same numbers in the
        # same order as one draw per step; CUDA's Philox cuts its stream by launch, so a seed gives
        # other numbers there than before blocks, but alone and in a batch still the same ones)
        self._draws: torch.Tensor | None = None
        self._drawn = 0
        self._seen: torch.Tensor | None = None  # the repetition penalty's presence mask (rows, V)
        if settings.repetition_penalty != 1.0:
            self._seen = torch.zeros(n, batch.engine.cfg.vocab_size, dtype=torch.bool, device=prompt.device)
            self._seen[:, prompt] = True

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> list[int | None]:
        ids = self.next_ids().tolist()
        last = self._steps == self.settings.max_new_tokens
        out: list[int | None] = []
        for row, tok in enumerate(ids):
            if self.finish_reasons[row] is None:
                self.completion_tokens[row] += 1
                if tok in self._stop_ids:
                    self._finish(row, "stop")
                    tok = None
                elif last:
                    self._finish(row, "length")
            else:
                tok = None
            out.append(tok)
        return out

    def stop(self, row: int) -> None:
        """End one sample ("stop"): the text layer found a stop string. Its row rides along unused.
        A stop string in the very last token turns that step's "length" into "stop"."""
        self._finish(row, "stop")

    def _finish(self, row: int, reason: str) -> None:
        if self.finish_reasons[row] is None:
            self._running -= 1
        self.finish_reasons[row] = reason
        self._settle()

    def _settle(self) -> None:
        """Once every sample has ended, the model has nothing more to read for these rows."""
        if self.done and self.rows is not None:
            self.rows.last = None

    @property
    def done(self) -> bool:
        """Every sample has ended: no more steps."""
        return self._running == 0 or self._steps >= self.settings.max_new_tokens

    @property
    def ready_to_draw(self) -> bool:
        """Its rows are fed (the logits are for its next ids), which are not drawn yet."""
        rows = self.rows
        return rows is not None and not rows.due and rows.picked is None and not self.done

    def close(self) -> None:
        """End every sample now and give the rows back to the batch (a server's cancelled request)."""
        for row, reason in enumerate(self.finish_reasons):
            if reason is None:
                self._finish(row, "stop")
        if self.rows is not None:
            self.batch.leave(self.rows)
        self.rows = self._seen = None  # type: ignore[assignment]

    def next_ids(self) -> torch.Tensor:
        """The raw step: (rows,) new ids on CPU, every row (ended ones too); no bookkeeping of rows."""
        rows = self.rows
        if self.done or rows is None:
            raise StopIteration
        nxt = rows.picked
        if nxt is not None and self._seen is None and self.settings.logprobs is None and nxt.device.type == "cpu":
            # drawn by the batch, nothing else to compute: no torch scope (a server's per-stream cost)
            rows.picked = None
            self._took(nxt)
            return nxt
        with _Scoped(self.batch.engine.threads):  # read each step: the count follows the load
            if rows.due:  # not fed by a shared step of the batch: the batch feeds these rows alone
                self.batch.advance([rows])
            nxt = rows.picked if rows.picked is not None else self._pick()
            rows.picked = None
            if self.settings.logprobs is not None:
                self.last_logprobs = token_logprobs(rows.logits, nxt, self.settings.logprobs)
            if self._seen is not None:
                self._seen.scatter_(1, nxt[:, None], True)
            self._took(nxt)
            return nxt.cpu()

    def _took(self, ids: torch.Tensor) -> None:
        """ids are drawn: the model reads them next, unless that was the last step."""
        self.rows.last = ids
        self._steps += 1
        self._settle()

    def _pick(self) -> torch.Tensor:
        s = self.settings
        u = None if s.temperature == 0 else self.uniform_draws()
        return pick_next(self.sampling_logits(), s.temperature, s.top_k, s.top_p, None, u)

    def uniform_draws(self) -> torch.Tensor:
        """This step's (rows, 1) float64 uniform draws from the stream's own generator. Drawn 32
        steps at a time (one torch.rand instead of 32): what one draw per step gives, in order."""
        if self._draws is None or self._drawn == self._draws.size(0):
            steps = max(1, min(32, self.settings.max_new_tokens - self._steps))
            self._draws = torch.rand(steps, self.settings.num_samples, 1, generator=self._gen,
                                     dtype=torch.float64, device=self._gen.device)
            self._drawn = 0
        self._drawn += 1
        return self._draws[self._drawn - 1]

    def sampling_logits(self) -> torch.Tensor:
        """The logits the next ids are drawn from: the model's, with the repetition penalty applied."""
        if self._seen is None:
            return self.rows.logits
        return penalize(self.rows.logits, self._seen, self.settings.repetition_penalty)


class DecodeBatch:
    """One KV cache whose rows belong to one or several generations, stepped by one forward together.

    start() adds a generation (a TokenStream over a `Rows` record of its own); advance() feeds the
    last drawn ids of every due generation through the model at once, each row at its own position
    (Decoder.step_rows), and leaves each its rows of the logits, so a step costs about one matrix
    read of the weights whatever the number of rows; pick(streams) draws their next ids together.
    Rows are kept packed in join order: a generation that leaves has the rows after it moved down
    (a copy of their filled keys), so the usual step reads adjacent rows as views. The cache grows
    (doubling, what is cached copied) when a generation joins a full one and when a row would pass
    the positions it has room for (up to the context), and gives its positions back when the last
    generation leaves, so memory follows the rows and tokens in use. The batch holds Rows records,
    never streams: a stream refers to its batch, so a dropped stream frees its own batch's cache at
    once (gigabytes for 64 GPT-2 samples), without the cycle collector.
    Not thread-safe: one thread steps a batch (the server's scheduler thread).
    """

    def __init__(self, engine: Engine, rows: int = 1, shared: bool = True, positions: int = 0):
        """shared: for many generations (a server's), else one generation's own batch of rows.
        positions: the tokens each row has room for at first (a generation alone: its prompt and
        its new tokens; a shared batch starts with none and grows as its rows need)."""
        self.engine, self.shared = engine, shared
        with _Scoped(engine.threads):
            # one generation of several samples steps many rows too (--num-samples 64)
            self.dec = engine.decoder(many_rows=shared or rows >= MANY_ROWS)
            self.cache = self.dec.new_cache(max(1, rows), engine.device, positions)
        self.members: list[Rows] = []  # in row order
        self.used = 0
        # windows (new prompts, slid windows) ride in the batch's forward only when its step
        # matrices are the model's own float32 tensors, which prefill() uses: a stream's output
        # must not depend on its neighbours (a bfloat16 step of a prompt would)
        self.merge_fills = self.dec.step_dtype == self.dec.wte.dtype

    def start(self, prompt_ids: list[int], settings: SamplingSettings,
              stop_token_ids: Collection[int] = ()) -> TokenStream:
        """A new generation in rows of its own. Its prompt is checked now; in a shared batch whose
        forward may take windows (merge_fills) it is prefilled in the next advance(), in the
        forward of the others' steps, else now."""
        check_prompt(prompt_ids, self.engine.cfg.block_size)
        with _Scoped(self.engine.threads):
            prompt = torch.tensor(prompt_ids, dtype=torch.long, device=self.engine.device)
            rows = self._join(prompt.expand(settings.num_samples, -1))
            try:
                if not settings.max_new_tokens:
                    rows.fill = None  # nothing will be drawn: the model need not read the prompt
                elif not (self.shared and self.merge_fills):
                    self._prefill(rows)
                return TokenStream(self, rows, prompt, settings, stop_token_ids)
            except BaseException:
                self.leave(rows)
                raise

    def _join(self, prompt: torch.Tensor) -> Rows:
        """Rows for a new generation whose samples start from prompt (rows, L); the cache grows if it must."""
        n = prompt.size(0)
        self._make_room(self.used + n, prompt.size(1))
        rows = Rows(self.used, n, self.cache.rows(self.used, n), list(prompt.unbind(1)), fill=prompt)
        self.members.append(rows)
        self.used += n
        return rows

    def leave(self, rows: Rows) -> None:
        """Give a generation's rows back; the ones after it move down so rows stay packed."""
        if rows not in self.members:
            return
        i = self.members.index(rows)
        self.members.pop(i)
        start = rows.first
        with _Scoped(self.engine.threads):  # the cache is an inference tensor
            for later in self.members[i:]:
                self._move(later, start)
                start += later.count
            if not self.members:  # nothing cached is needed: give the room back, keep the rows
                self._resize(self.cache.k.size(1), 0)
        self.used = start

    def _move(self, rows: Rows, to: int) -> None:
        old, n, pos = rows.first, rows.count, rows.cache.pos
        if pos:
            for t in (self.cache.k, self.cache.v):
                t[:, to : to + n, :, :pos] = t[:, old : old + n, :, :pos].clone()
        rows.first, rows.cache = to, self.cache.rows(to, n, pos)

    def _make_room(self, rows: int, positions: int) -> None:
        """A cache of at least rows rows with room for positions tokens each. What it lacks grows
        to at least twice what it has (so a batch that keeps growing copies its cache a logarithmic
        number of times), the positions to at most the context."""
        have_rows, room = self.cache.k.size(1), self.cache.capacity
        if rows > have_rows or positions > room:
            block = self.dec.cfg.block_size
            self._resize(max(rows, 2 * have_rows) if rows > have_rows else have_rows,
                         min(block, max(positions, 2 * room)) if positions > room else room)

    def _resize(self, rows: int, positions: int) -> None:
        """The cache becomes one of rows rows and positions tokens, holding what is cached (a
        smaller one only when nothing is); the members' views move onto it."""
        if self.members:
            self.cache = self.cache.resized(rows, positions)
        else:
            self.cache = self.dec.new_cache(rows, self.cache.k.device, positions)
        for member in self.members:
            member.cache = self.cache.rows(member.first, member.count, member.cache.pos)

    def advance(self, members: Sequence[Rows] | None = None) -> int:
        """Feed the drawn ids of every due member (or of the ones given) in one forward; returns
        the rows fed by it. A member whose window is full slides (its cache rebuilt from the newest
        half): in the same forward when several are due and the steps are float32 (a window of 32
        tokens then costs a little more than a step, not a prefill of its own), else in a prefill
        apart, not counted."""
        due = [rows for rows in (self.members if members is None else members) if rows.due]
        if not due:
            return 0
        with _Scoped(self.engine.threads):
            for rows in due:  # a prompt not prefilled yet is read as it is
                if rows.fill is None:
                    self._append_or_slide(rows)
            stepping = [rows for rows in due if rows.fill is None]
            filling = [rows for rows in due if rows.fill is not None]
            if len(due) > 1 and self.merge_fills:
                self._step_together(stepping, filling)
            else:
                for rows in filling:
                    self._prefill(rows)
                filling = []
                if len(stepping) == 1:  # one generation: the plain step, its rows a view of their own
                    rows = stepping[0]
                    rows.logits = self.dec.step(rows.last, rows.cache)
                elif stepping:
                    self._step_together(stepping, [])
            for rows in due:
                rows.last = None
        return sum(rows.count for rows in stepping) + sum(rows.count for rows in filling)

    def _append_or_slide(self, rows: Rows) -> None:
        """The last ids join the window. If the cache has no room for them, the window is cut to
        its newest half and becomes the rows' fill: the cache is rebuilt from it."""
        block, pos = self.dec.cfg.block_size, rows.cache.pos
        rows.window.append(rows.last)
        if pos >= block:
            rows.window = rows.window[-max(1, block // 2):]
            rows.fill = torch.stack(rows.window, dim=1)
        elif pos >= rows.cache.capacity:  # short of the context: more room, what is cached kept
            self._make_room(self.cache.k.size(1), pos + 1)

    def _prefill(self, rows: Rows) -> None:
        """Rebuild the rows' cache from their fill in a prefill of their own; the logits are ready."""
        rows.cache.reset()
        rows.logits = self.dec.prefill(rows.fill, rows.cache)
        rows.fill = None

    def _step_together(self, stepping: list[Rows], filling: list[Rows]) -> None:
        """One forward: a step for each of stepping, its fill (a slid window, a prompt) for each of filling."""
        dev = self.cache.k.device
        if stepping:
            toks = torch.cat([rows.last for rows in stepping])
            pos = torch.tensor([rows.cache.pos for rows in stepping for _ in range(rows.count)],
                               dtype=torch.long, device=dev)
            first = stepping[0].first
            adjacent = all(b.first == a.first + a.count for a, b in zip(stepping, stepping[1:]))
            which: slice | torch.Tensor = (
                slice(first, first + len(toks)) if adjacent else
                torch.tensor([r for rows in stepping for r in range(rows.first, rows.first + rows.count)],
                             dtype=torch.long, device=dev))
        else:
            toks = pos = torch.zeros(0, dtype=torch.long, device=dev)
            which = slice(0, 0)
        fills = [(rows.first, rows.fill) for rows in filling]
        logits = self.dec.step_rows(toks, pos, self.cache, which, fills)
        everyone = stepping + filling
        for rows, part in zip(everyone, logits.split([rows.count for rows in everyone])):
            rows.logits = part
        for rows in stepping:
            rows.cache.pos += 1
        for rows, (_, ids) in zip(filling, fills):
            rows.cache.pos, rows.fill = ids.size(1), None

    def pick(self, streams: Sequence[TokenStream]) -> None:
        """Draw the next ids of the streams (of this batch) that are ready to draw, one sampling
        pass per group of equal settings: the distributions of all its rows at once, each stream's
        uniform draws from its own generator (what it would draw alone, so the ids are the same).
        A stream alone in its group draws when asked for its ids."""
        groups: dict[tuple[float, int, float], list[TokenStream]] = {}
        for stream in streams:
            if stream.ready_to_draw:
                s = stream.settings
                groups.setdefault((s.temperature, s.top_k, s.top_p), []).append(stream)
        with _Scoped(self.engine.threads):
            for (temperature, top_k, top_p), group in groups.items():
                if len(group) == 1:
                    continue
                logits = torch.cat([stream.sampling_logits() for stream in group])
                u = None if temperature == 0 else torch.cat([stream.uniform_draws() for stream in group])
                ids = pick_next(logits, temperature, top_k, top_p, None, u)
                for stream, part in zip(group, ids.split([stream.rows.count for stream in group])):
                    stream.rows.picked = part


class Engine:
    """Samples from a GPT with a KV cache. One Engine per model; its TokenStreams may interleave.

    decode_dtype is the dtype of the matrices in one-token decode steps (prefills are float32):
    "float32"; "float16" or "bfloat16" (asked for: used without a check); or "auto", which tries a
    low precision only on a CPU, for a model of at least LOW_PRECISION_MIN_PARAMS parameters
    (there a step is bound by memory bandwidth, not overhead), float16 where the CPU has fast
    float16 matrix-vector kernels (AVX-512), then bfloat16 where it has native bf16 (AVX512-BF16 /
    AMX), and keeps the first whose logits on a probe stay within LOGIT_TOLERANCE of float32; float32
    otherwise (decoder.build_decoder). The choice is made at the first generation (the probe costs a
    few decode steps) and made again if the model's weights have changed since. Same seed, same
    choice, same output (on the same thread count). `threads` is the thread count the engine's own
    work runs on, read at each step: following the machine's load for a model of SINGLE_THREAD_PARAMS
    or more (LoadThreads), else decode_threads'; None: the caller's. Setting it fixes the count.
    """

    def __init__(self, model: GPT, device: torch.device | None = None, decode_dtype: str = "auto"):
        if decode_dtype not in DECODE_DTYPES:
            raise PocketError(f"decode_dtype must be one of {', '.join(DECODE_DTYPES)}, got '{decode_dtype}'")
        self.model = model.eval()
        self.cfg = model.config
        self.device = device or next(model.parameters()).device
        self.decode_dtype = decode_dtype
        self._fixed_threads = decode_threads(model) if self.device.type == "cpu" else None
        self._load = load_threads(model, self.device)
        self._decoders: dict[bool, Decoder] = {}  # by many_rows
        self._versions: list[int] = []
        self.logit_diffs: dict[str, float] = {}  # auto's probe: max |logit - float32 logit| per dtype tried

    @property
    def threads(self) -> int | None:
        """The thread count for the engine's next piece of work (None: the caller's): following the
        machine's load where it can (LoadThreads), else decode_threads'."""
        return self._load.now() if self._load is not None else self._fixed_threads

    @threads.setter
    def threads(self, n: int | None) -> None:  # a count asked for: kept, the load no longer followed
        self._load, self._fixed_threads = None, n

    @property
    def step_dtype(self) -> torch.dtype:
        """The dtype of the decode steps' matrices (decided at the first generation)."""
        return self.decoder().step_dtype

    def decoder(self, many_rows: bool = False) -> Decoder:
        """The decoder for one generation of fewer than MANY_ROWS samples (many_rows False) or for
        many rows (a batch shared by many generations, or MANY_ROWS samples or more): "auto" gives
        the latter float16 steps only where float16's many-row matmuls measured fast
        (decoder.float16_rows_fast): its matrix-vector products are fast on AVX-512, its many-row
        matmuls only with AVX512-FP16 (GPT-2-small, 16 rows, 1 thread, a Zen 4, busy: 275 ms a step
        in float16, 115 in float32, 93 in bfloat16; 1 row: 27, 54, 62; on an Intel Xeon with
        AVX512-FP16, a 0.6B-parameter model, 8 rows, 2 threads: 38 tokens/s in float16, 25 in float32). A batch keeps its
        choice for every step, whatever its row count, so a request's output does not depend on
        how many others share its steps."""
        versions = [p._version for p in self.model.parameters()]  # bumped by every in-place update
        if versions != self._versions:
            self._decoders, self._versions = {}, versions
        many_rows = many_rows and self.decode_dtype == "auto"  # a dtype asked for: one decoder, one weight copy
        if many_rows not in self._decoders:
            with _Scoped(self.threads):
                dec, diffs = build_decoder(self.model, self.decode_dtype, self.device, many_rows)
            if diffs is not None:
                self.logit_diffs = diffs
            self._decoders[many_rows] = dec
        return self._decoders[many_rows]

    def start(self, prompt_ids: list[int], settings: SamplingSettings,
              stop_token_ids: Collection[int] = ()) -> TokenStream:
        """Check the prompt, prefill, and return the generation's TokenStream. settings.stop and
        settings.stop_at_eos are text-level (sampling.TextStream); the engine ends a sample at any
        of stop_token_ids (e.g. a tokenizer's end-of-text id) and does not give that id out."""
        check_prompt(prompt_ids, self.cfg.block_size)  # before a cache is allocated for it
        # room for the prompt and every new token (capped at the context), not the whole context:
        # a model declaring 40k positions would otherwise cost gigabytes per sample
        positions = len(prompt_ids) + settings.max_new_tokens
        batch = DecodeBatch(self, settings.num_samples, shared=False, positions=positions)
        return batch.start(prompt_ids, settings, stop_token_ids)

    def generate(self, prompt_ids: list[int], settings: SamplingSettings | int | None = None,
                 on_step: Callable[[], None] | None = None, stop_token_ids: Collection[int] = (),
                 **changes: Any) -> list[list[int]]:
        """All samples at once: num_samples lists of new token ids (a sample that met a stop token
        id ends before it, without it); on_step() after each step (progress). settings: a
        SamplingSettings, or max_new_tokens with the other settings as keywords (as_settings)."""
        tokens = self.start(prompt_ids, as_settings(settings, **changes), stop_token_ids)
        if not stop_token_ids:  # the fast path: every row runs to max_new_tokens
            steps = []
            for _ in range(tokens.settings.max_new_tokens):
                steps.append(tokens.next_ids())
                if on_step is not None:
                    on_step()
            return torch.stack(steps, dim=1).tolist() if steps else [[] for _ in tokens.finish_reasons]
        out: list[list[int]] = [[] for _ in tokens.finish_reasons]
        for step in tokens:
            for row, tok in zip(out, step):
                if tok is not None:
                    row.append(tok)
            if on_step is not None:
                on_step()
        return out
