"""Recipe levers against the recipe at equal wall time, on three corpora: Tiny Shakespeare, Python source
code and German prose, in bits per byte of the full val split (so corpora and tokenizers compare).

    python bench/levers.py                                       # --short-context 32 on cpu-15min:3m, 2 runs (~40 min)
    python bench/levers.py --lever "--short-context 16" --recipe demo:2m --repeats 3
    python bench/levers.py --lever "--decay-fraction 0.6" --lever "--muon-momentum-warmup 300"   # several: one table
    python bench/levers.py --recipe demo:15s --repeats 1         # a smoke test of the script itself

Why: a change that wins on Shakespeare and loses elsewhere is tuned to one text. The two other corpora
are assembled from what a Python machine has, each about Tiny Shakespeare's size (1.1 MB):
- code: the standard library's own .py files (sysconfig's stdlib folder), in name order;
- german: Debian's German manual pages (/usr/share/man/de), their roff markup stripped to the text.
A corpus whose files are missing here is left out with a line saying so. Each corpus is prepared once
(char tokenizer, val = the last 10 % of the text), and once more for a lever that names a tokenizer
(`--lever "--tokenizer bpe --vocab-size 1024"`: the same val text, so bits per byte compare); each run is `pocketgpt train --preset P --max-time B [lever]`,
then `pocketgpt eval` of its best checkpoint. Runs go corpus by corpus, recipe and levers in turns (A B C,
then C B A in the next repeat), so a slow patch of a shared machine hits them alike; several levers share the
recipe's runs, each measured alone against it (the ablation table: one column per lever).
"""

from __future__ import annotations

import gzip
import re
import statistics
import sys
import sysconfig
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402

CORPUS_CHARS = 1_115_394  # Tiny Shakespeare's length: the same size for every corpus
MAN_DE = Path("/usr/share/man/de")
# roff's two-letter names of the characters German pages use (the rest are dropped)
ROFF_CHARS = {":a": "ä", ":o": "ö", ":u": "ü", ":A": "Ä", ":O": "Ö", ":U": "Ü", "ss": "ß", "lq": "“", "rq": "”",
              "Bq": "„", "Fo": "«", "Fc": "»", "em": "—", "en": "–", "aq": "'", "dq": '"', "co": "©", "mu": "×"}


def python_code() -> str | None:
    """The standard library's .py files, name order, up to CORPUS_CHARS characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    return _joined((p.read_text(encoding="utf-8", errors="replace") for p in files))


def _roff_text(source: str) -> str:
    """The words of a roff manual page: request lines dropped (their arguments kept for headings and
    tagged paragraphs), font and character escapes removed."""
    out = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue  # a comment
        if line.startswith((".", "'")):
            words = line.split(None, 1)
            if len(words) < 2 or words[0][1:] not in ("SH", "SS", "B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "TP",
                                                       "IP", "Nm", "Nd", "Sh", "Ss"):
                continue
            line = words[1].replace('"', "")
        line = re.sub(r"\\f(\[[^]]*\]|\(..|.)", "", line)  # font changes
        line = re.sub(r"\\\((..)", lambda m: ROFF_CHARS.get(m.group(1), ""), line)  # named characters
        line = re.sub(r"\\\[[^]]*\]", "", line)
        line = re.sub(r"\\[&-]", lambda m: "-" if m.group(0) == "\\-" else "", line)
        line = line.replace("\\e", "\\").replace("\\ ", " ")
        out.append(line)
    return "\n".join(out)


def german_prose() -> str | None:
    """Debian's German manual pages, as text, name order, up to CORPUS_CHARS characters."""
    if not MAN_DE.is_dir():
        return None
    files = sorted(MAN_DE.rglob("*.gz"))
    return _joined(_roff_text(gzip.open(p, "rt", encoding="utf-8", errors="replace").read()) for p in files)


def _joined(texts: Any) -> str | None:
    parts, n = [], 0
    for t in texts:
        parts.append(t)
        n += len(t)
        if n >= CORPUS_CHARS:
            break
    text = "\n".join(parts)[:CORPUS_CHARS]
    return text if len(text) >= CORPUS_CHARS // 2 else None


CORPORA: dict[str, Callable[[], str | None]] = {"shakespeare": common.bundled_text, "code": python_code,
                                                "german": german_prose}


# a lever with these flags is a different preparation of the corpus (a tokenizer): its own data folder
PREPARE_FLAGS = ("--tokenizer", "--vocab-size")


def split_flags(flags: list[str]) -> tuple[list[str], list[str]]:
    """A lever's flags as (prepare's, train's): each PREPARE_FLAGS flag with its value goes to prepare."""
    prep: list[str] = []
    train: list[str] = []
    it = iter(flags)
    for flag in it:
        if flag.split("=", 1)[0] in PREPARE_FLAGS:
            prep += [flag] if "=" in flag else [flag, next(it, "")]
        else:
            train.append(flag)
    return prep, train


def run_one(data: Path, run: Path, recipe: str, extra: list[str]) -> float:
    preset, _, budget = recipe.partition(":")
    common.train(data, run, "--preset", preset, *(["--max-time", budget] if budget else []), "--sample-tokens", "0",
                 *common.NO_PLOTS, *extra)
    return common.evaluate(run)["bits_per_byte"]


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--recipe", default="cpu-15min:3m", help="PRESET[:MAX_TIME]")
    ap.add_argument("--lever", action="append", help="the flags one lever adds, space-separated; repeat the "
                    "option for several levers (default: --short-context 32)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--corpora", default=",".join(CORPORA))
    args = ap.parse_args()
    levers = args.lever or ["--short-context 32"]
    print(f"recipe {args.recipe}, levers: {' | '.join(levers)}", flush=True)
    rows = [r for name in args.corpora.split(",") if (r := measure_corpus(name, args.recipe, levers, args.repeats))]
    print_table(rows, levers)


def measure_corpus(name: str, recipe: str, levers: list[str], repeats: int) -> dict[str, Any] | None:
    """Bits per byte of the recipe and of each lever on one corpus, `repeats` runs each, in turns."""
    text = CORPORA[name]()
    if text is None:
        print(f"{name}: its files are not on this machine; left out", flush=True)
        return None
    with common.scratch() as tmp:
        (tmp / f"{name}.txt").write_text(text, encoding="utf-8")
        who = ["recipe", *levers]
        flags = {w: split_flags([] if w == "recipe" else w.split()) for w in who}
        data: dict[str, Path] = {}
        for prep, _ in flags.values():  # one data folder per preparation (the char tokenizer's, and a lever's own)
            if " ".join(prep) not in data:
                data[" ".join(prep)] = folder = tmp / f"data-{name}-{len(data)}"
                common.pocketgpt("prepare", str(tmp / f"{name}.txt"), "--out", str(folder), *prep)
        got: dict[str, list[float]] = {w: [] for w in who}
        for rep in range(repeats):
            for k, w in enumerate(who if rep % 2 == 0 else who[::-1]):
                prep, train = flags[w]
                bpb = run_one(data[" ".join(prep)], tmp / f"run-{name}-{rep}-{k}", recipe, train)
                got[w].append(bpb)
                print(f"  {name} {w} run {rep + 1}: {bpb:.4f} bits/byte", flush=True)
    # each lever against the recipe run of the same repeat (the one beside it in time)
    diffs = {lv: statistics.median(b - a for a, b in zip(got["recipe"], got[lv])) for lv in levers}
    return {"corpus": name, "got": got, "diff": diffs}


def print_table(rows: list[dict[str, Any]], levers: list[str]) -> None:
    def runs(xs: list[float]) -> str:
        return f"{statistics.median(xs):.4f} ({', '.join(f'{x:.4f}' for x in xs)})"

    print("\n| corpus | recipe: bits/byte, median (runs) | " + " | ".join(f"`{lv}`" for lv in levers) + " |")
    print("|---|---:|" + "---:|" * len(levers))
    for r in rows:
        cells = [f"{runs(r['got'][lv])}, **{r['diff'][lv]:+.4f}**" for lv in levers]
        print(f"| {r['corpus']} | {runs(r['got']['recipe'])} | " + " | ".join(cells) + " |")
    print("\n(each lever cell: its median (runs), then the median of lever - recipe over the repeats)")


if __name__ == "__main__":
    main()
