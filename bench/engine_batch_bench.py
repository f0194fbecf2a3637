"""The serving engine alone (no HTTP): N streams in one engine.DecodeBatch, stepped as the server's
scheduler steps them (advance, pick, then each stream's TextStream.next_chunks), on a run folder.

    python bench/engine_batch_bench.py --model RUN [--n 1,4,16,64] [--max-tokens 128] [--repeats 5]
    python bench/engine_batch_bench.py --model RUN --profile 16     # cProfile of one N=16 level

Streams arrive as a burst does at the server: all are waiting at the start and one is admitted
(prefilled) per turn, so their positions differ and their windows slide at different turns. Each
has the serve bench's prompt, temperature 0.8 and its own seed. Per N: aggregate tokens/s (all
streams' tokens over the time from the first admission to the last token), the median turn in
ms and its split: forward (advance), sampling (pick) and the text layer (next_chunks of every
stream, with its per-stream bookkeeping). Times are this thread's CPU time (time.thread_time), so
that another process taking a core now and then (a shared machine) inflates them less than wall
time; --wall measures wall time instead.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

PROMPT = "ROMEO:\nWhat light through yonder window breaks?\n"


CLOCK = time.thread_time


def level(model, n: int, max_tokens: int, prompt: str = PROMPT) -> dict[str, float]:
    from pocketgpt.engine import DecodeBatch
    from pocketgpt.sampling import SamplingSettings

    clock = CLOCK
    batch = DecodeBatch(model.engine)
    waiting = [SamplingSettings(max_new_tokens=max_tokens, temperature=0.8, seed=1000 + i) for i in range(n)]
    streams, live = [], []
    fwd, smp, txt, turns = [], [], [], []
    t0 = clock()
    while live or waiting:
        a = clock()
        if waiting:  # one admission per turn, as the scheduler does
            streams.append(model.text_stream(prompt, waiting.pop(0), batch=batch))
            live.append(streams[-1])
        batch.advance()
        b = clock()
        batch.pick()
        c = clock()
        for s in list(live):
            chunks = s.next_chunks()
            if chunks is None or s.tokens.done:
                if chunks is not None:
                    s.next_chunks()
                s.tokens.close()
                live.remove(s)
        d = clock()
        fwd.append(b - a), smp.append(c - b), txt.append(d - c), turns.append(d - a)
    wall = clock() - t0
    tokens = sum(sum(s.tokens.completion_tokens) for s in streams)
    ms = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
    return {"tok_s": tokens / wall, "turn": ms(turns), "fwd": ms(fwd), "pick": ms(smp), "text": ms(txt),
            "tokens": tokens, "wall": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--n", default="1,4,16,64")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", type=int, default=0, help="cProfile one level of this N instead")
    p.add_argument("--wall", action="store_true", help="wall time instead of this thread's CPU time")
    p.add_argument("--prompt", default=PROMPT, help="the prompt of every stream (default: the serve bench's)")
    args = p.parse_args()
    if args.wall:
        global CLOCK
        CLOCK = time.perf_counter
    from pocketgpt.loading import load

    model = load(args.model)
    level(model, 2, 8)  # warm-up
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
