"""The serving engine alone (no HTTP): N generations in one loading.TextBatch, stepped as the
server's scheduler steps them (TextBatch.step: one forward, one pick, each generation's chunks), on a run folder.

    python bench/engine_batch_bench.py --model RUN [--n 1,4,16,64] [--max-tokens 128] [--repeats 5]
    python bench/engine_batch_bench.py --model RUN --profile 16     # cProfile of one N=16 level
    python bench/engine_batch_bench.py --model RUN --bound 16       # what the matmuls alone allow

Streams arrive as a burst does at the server: all are waiting at the start and one is admitted
(prefilled) per turn, so their positions differ and their windows slide at different turns. Each
has the serve bench's prompt, temperature 0.8 and its own seed. Per N: aggregate tokens/s (all
streams' tokens over the time from the first admission to the last token), the median turn in
ms and its split: forward (DecodeBatch.advance), sampling (DecodeBatch.pick) and the text layer
(the rest of the step: every generation's chunks, with its bookkeeping), timed by wrapping the two
engine methods for the run. Times are this thread's CPU time (time.thread_time), so
that another process taking a core now and then (a shared machine) inflates them less than wall
time; --wall measures wall time instead.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from pocketgpt.loading import LoadedModel

PROMPT = "ROMEO:\nWhat light through yonder window breaks?\n"


CLOCK = time.thread_time


@contextlib.contextmanager
def timed(cls: type, name: str, spent: list[float]) -> Iterator[None]:
    """Every call of cls.name adds its time to spent[0], while inside."""
    real: Callable = getattr(cls, name)

    def wrapper(*args, **kwargs):
        t = CLOCK()
        try:
            return real(*args, **kwargs)
        finally:
            spent[0] += CLOCK() - t

    setattr(cls, name, wrapper)
    try:
        yield
    finally:
        setattr(cls, name, real)


def level(model: "LoadedModel", n: int, max_tokens: int, prompt: str = PROMPT) -> dict[str, float]:
    from pocketgpt.engine import DecodeBatch
    from pocketgpt.sampling import SamplingSettings

    clock = CLOCK
    batch = model.batch()
    waiting = [SamplingSettings(max_new_tokens=max_tokens, temperature=0.8, seed=1000 + i) for i in range(n)]
    generations, live = [], 0
    advance, pick = [0.0], [0.0]  # running totals
    fwd, smp, txt, turns = [], [], [], []
    t0 = clock()
    with timed(DecodeBatch, "advance", advance), timed(DecodeBatch, "pick", pick):
        while live or waiting:
            a, before = clock(), (advance[0], pick[0])
            if waiting:  # one admission per turn, as the scheduler does
                generations.append(batch.add(prompt, waiting.pop(0)))
                live += 1
            b = clock()
            live -= sum(p.ended for p in batch.step())
            turn = clock() - a
            f, s = (b - a) + advance[0] - before[0], pick[0] - before[1]  # an admission counts as forward
            fwd.append(f), smp.append(s), txt.append(turn - f - s), turns.append(turn)
    wall = clock() - t0
    tokens = sum(g.generated for g in generations)
    ms = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
    return {"tok_s": tokens / wall, "turn": ms(turns), "fwd": ms(fwd), "pick": ms(smp), "text": ms(txt),
            "tokens": tokens, "wall": wall}


def bound(model: "LoadedModel", n: int, repeats: int) -> None:
    """A decode step's matmul chain alone (norms, the block matrices, the activation, the head: the
    decoder's own tensors and calls, no attention, no cache) at 1 row and at n rows, against the real
    step (Decoder.step, 1 row) and the batch's step (step_rows, n rows at positions spread over the
    context), interleaved, wall time: the ratio the matmuls themselves allow at this shape and CPU."""
    import torch

    dec = model.engine.decoder(many_rows=True)  # the decode dtype a batch of streams gets
    torch.set_num_threads(model.engine.threads or torch.get_num_threads())
    C, V, T, W = dec.cfg.n_embd, dec.cfg.vocab_size, dec.cfg.block_size, dec.width

    def no_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        return qkv[:, :W].contiguous()  # the projection's input, of the attention output's shape

    def chain(x: torch.Tensor) -> torch.Tensor:  # the decoder's own block wiring, attention left out
        return dec.logits(dec.blocks(x, one, no_attention))

    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        xs = {r: torch.randn(r, C, generator=gen) for r in (1, n)}
        one, many = dec.new_cache(1, torch.device("cpu")), dec.new_cache(n, torch.device("cpu"))
        tok = torch.randint(0, V, (n,), generator=gen)
        pos = torch.randint(T // 4, T - 1, (n,), generator=gen)

        def step1():
            one.pos = T // 2
            dec.step(tok[:1], one)

        cases = {"chain 1": lambda: chain(xs[1].clone()), f"chain {n}": lambda: chain(xs[n].clone()),
                 "step 1": step1, f"step_rows {n}": lambda: dec.step_rows(tok, pos, many, slice(0, n))}
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(repeats):  # interleaved: a load change hits every case alike
            for name, f in cases.items():
                for _ in range(20):
                    f()
                t0 = time.perf_counter()
                for _ in range(200):
                    f()
                times[name].append((time.perf_counter() - t0) / 200 * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"| case | ms (median of {repeats}) | tokens/s |")
    print("|---|---|---|")
    for name, ms in med.items():
        rows = int(name.split()[-1])
        print(f"| {name} row{'s' if rows > 1 else ''} | {ms:.3f} | {rows / ms * 1e3:,.0f} |")
    print(f"matmul chain: {n} rows cost {med[f'chain {n}'] / med['chain 1']:.2f}x 1 row "
          f"(tokens/s ratio {n * med['chain 1'] / med[f'chain {n}']:.2f}x); real steps: "
          f"{med[f'step_rows {n}'] / med['step 1']:.2f}x (tokens/s ratio {n * med['step 1'] / med[f'step_rows {n}']:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--n", default="1,4,16,64")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", type=int, default=0, help="cProfile one level of this N instead")
    p.add_argument("--bound", type=int, default=0, help="time the matmul chain alone at 1 and this many rows instead")
    p.add_argument("--wall", action="store_true", help="wall time instead of this thread's CPU time")
    p.add_argument("--prompt", default=PROMPT, help="the prompt of every stream (default: the serve bench's)")
    args = p.parse_args()
    if args.wall:
        global CLOCK
        CLOCK = time.perf_counter
    from pocketgpt.loading import load

    model = load(args.model)
    if args.bound:
        return bound(model, args.bound, args.repeats)
    level(model, 2, 8, args.prompt)  # warm-up
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        level(model, args.profile, args.max_tokens)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        return
    ns = [int(x) for x in args.n.split(",")]
    rows: dict[int, list[dict[str, float]]] = {n: [] for n in ns}
    for _ in range(args.repeats):  # interleaved levels, so a load change hits every N alike
        for n in ns:
            rows[n].append(level(model, n, args.max_tokens, args.prompt))
    print("| N | aggregate tok/s | turn ms | forward ms | pick ms | text ms |")
    print("|---|---|---|---|---|---|")
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in rows.items()}
    for n, m in med.items():
        print(f"| {n} | {m['tok_s']:.0f} | {m['turn']:.3f} | {m['fwd']:.3f} | {m['pick']:.3f} | {m['text']:.3f} |")
    if 1 in med and 16 in med:
        print(f"aggregate(N=16) / aggregate(N=1) = {med[16]['tok_s'] / med[1]['tok_s']:.2f}x; "
              f"turn(N=16) / turn(N=1) = {med[16]['turn'] / med[1]['turn']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
