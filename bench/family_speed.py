"""LoRA fine-tuning and generation at the SmolLM2-135M and Qwen3-0.6B shapes: pocketgpt against what a
user would pick instead, Transformers (+ peft), on this CPU.

    python bench/family_speed.py                                # everything below (~40 min on 2 cores)
    python bench/family_speed.py --parts train --shapes smollm2-135m --rounds 5
    python bench/family_speed.py --parts rss --repeats 3        # peak memory only, one child per run
    python bench/family_speed.py --parts generate --new-tokens 64 --streams 1,8
    python bench/family_speed.py --dtype bfloat16               # bf16 autocast for both (AVX512-BF16 / AMX CPUs)
    python bench/family_speed.py --parts profile --shapes smollm2-135m   # where a step's time goes
    python bench/family_speed.py --tiny                         # tiny shapes: a smoke test in seconds

Random weights of the published shapes (bench/lora_memory.py's SHAPES); no download.

train: one LoRA fine-tuning step, batch 1, context 512, rank 8 (alpha 16) on every block matrix (q, k,
v, o, gate, up, down). pocketgpt: the real Trainer (Trainer.create, trainer.step: autocast, grad
clipping, fused AdamW), configured as `train --init-from BASE --lora-rank 8 --lora-targets
q_proj,...,down_proj --block-size 512 --batch-size 1` configures it (launch.finetune_config under the
finetune-lora preset), the base a GPT of the shape with random weights rounded to bfloat16 values (as the
real models are published), so its frozen matrices stay bfloat16 (lora_base_dtype auto), computed in
float32. Transformers: LlamaForCausalLM / Qwen3ForCausalLM built from a config (random init, float32, since bf16
compute is far slower on a CPU without bf16 instructions; attn_implementation "sdpa", use_cache off), peft's
get_peft_model with LoraConfig(r=8, lora_alpha=16, target_modules=[q,k,v,o,gate,up,down]), and a plain
loop: forward with labels, backward, torch AdamW step, zero_grad. Both eager, both on the same token
stream (the bundled corpus in a byte-level BPE of the script's own, ids inside the model's vocabulary).
Steps run interleaved in one process (warm-up steps, then A, B, A, B ... rounds); the table gives median
ms/step, tokens/s = context / step seconds, and the median of the per-round speed ratios.

rss: the same fine-tune, each contender in a child process of its own (build, a few steps): VmRSS once
the imports are done and once the model is built, and the process's peak (VmHWM); medians of --repeats.

generate: the Qwen3-0.6B shape, float32, a 32-token prompt and 64 new tokens. pocketgpt's Engine over a
GPT (decode_dtype auto, its own thread choice) against transformers' generate (KV cache) on the very
same weights (copied with pocketgpt's own export mapping; the logits are compared first). One stream
greedy; 8 streams as one batch of 8 samples, temperature 0.8, no top-k/top-p (Engine num_samples=8 with
a seed; generate on a batch of 8 copies of the prompt). Transformers runs on torch's default threads and
on one; tokens/s counts every stream's new tokens; interleaved rounds, medians.
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402
from lora_memory import FAMILY, SHAPES, own_tokenizer  # noqa: E402

# smoke-test shapes: the two families' wiring (grouped-query attention; Qwen3's head size and QK-norm gains)
TINY: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(vocab_size=4096, block_size=1024, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, mlp_width=128,
                       rope_theta=100000.0, norm_eps=1e-5, **FAMILY),
    "tiny-qwen3": dict(vocab_size=4096, block_size=2048, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, head_size=32,
                       mlp_width=192, rope_theta=1000000.0, norm_eps=1e-6, qk_norm=True, qk_norm_gains=True, **FAMILY),
}
ALL_SHAPES = {**SHAPES, **TINY}
# peft's names for a Llama's / Qwen's block matrices; pocketgpt takes the same names (its fused q/k/v and
# gate/up matrices named together)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 8, 16
POCKETGPT, HF = "pocketgpt", "transformers + peft"


def status_mb(key: str) -> float:
    """A /proc/self/status memory line (VmRSS, VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def autocast(dtype: str) -> contextlib.AbstractContextManager:
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


def interleaved(contenders: dict[str, Callable[[int], object]], rounds: int) -> dict[str, list[float]]:
    """common.interleaved, each call's time said on stderr as it ends (a long run shows where it is)."""
    def said(name: str, fn: Callable[[int], object]) -> Callable[[int], object]:
        def run(r: int) -> object:
            t0 = time.perf_counter()
            got = fn(r)
            print(f"  round {r}: {name} {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            return got
        return run

    return common.interleaved({name: said(name, fn) for name, fn in contenders.items()}, rounds)


# --------------------------------------------------------------------------- the data


def prepare_data(shape: str, folder: Path) -> Path:
    """The bundled corpus's first 300 kB prepared with a byte-level BPE of 2,000 tokens whose vocabulary is the
    model's (what `train --init-from` prepares a pretrained model's text with): ids inside the vocabulary."""
    from pocketgpt.config import PrepareConfig
    from pocketgpt.corpus import prepare

    book = folder / "book.txt"
    folder.mkdir(parents=True, exist_ok=True)
    book.write_text(common.bundled_text()[:300_000], encoding="utf-8")
    tok = own_tokenizer(ALL_SHAPES[shape]["vocab_size"])
    return prepare(PrepareConfig(inputs=[str(book)], out=str(folder / "data"), tokenizer=tok.kind), tok)


def windows(data_dir: Path, context: int, seed: int) -> Callable[[int], Any]:
    """batch(i): a (1, context) tensor of train tokens at a random offset (the Transformers loop's input)."""
    import numpy as np
    import torch

    from pocketgpt.data import open_tokens, split_path

    tokens, _ = open_tokens(split_path(data_dir, "train"))

    def batch(i: int) -> Any:
        start = int(np.random.default_rng([seed, i]).integers(0, len(tokens) - context))
        return torch.from_numpy(np.asarray(tokens[start:start + context], dtype=np.int64))[None]

    return batch


# --------------------------------------------------------------------------- the contenders' fine-tune steps


Step = Callable[[int], None]  # step(i): one optimizer step on the i-th batch


def pocketgpt_step(shape: str, data_dir: Path, out: Path, context: int, dtype: str,
                   base_dtype: str = "auto") -> tuple[Step, int]:
    """pocketgpt's Trainer set up as `train --init-from BASE --lora-rank 8 ...` sets it up; (step(i), trainable)."""
    import torch

    from pocketgpt.config import ModelConfig
    from pocketgpt.launch import TrainRequest, finetune_config, lora_base_dtype
    from pocketgpt.lora import trainable_params
    from pocketgpt.metrics import MetricsLog
    from pocketgpt.model import GPT
    from pocketgpt.plan import check_config
    from pocketgpt.trainer import Trainer

    torch.manual_seed(0)
    base = GPT(ModelConfig(**ALL_SHAPES[shape]))  # the pretrained model: its shape and context, random weights
    with torch.no_grad():  # bfloat16 values, as SmolLM2 and Qwen3 are published
        for p in base.parameters():
            p.copy_(p.to(torch.bfloat16))
    overrides = {"block_size": context, "batch_size": 1, "dtype": dtype, "lora_rank": RANK, "lora_alpha": ALPHA,
                 "lora_targets": ",".join(TARGETS), "lora_base_dtype": base_dtype}
    cfg = finetune_config(TrainRequest(out=str(out)), overrides, base.config, lambda line: None)
    lora_base_dtype(cfg, base, lambda line: None)  # what `train --init-from` decides (auto: a bfloat16 frozen base)
    checked = check_config(cfg, out, overwrite=True, has_base=True)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer.create(checked.cfg, data_dir, out, checked.runtime,
                             MetricsLog(out / "metrics.jsonl", echo=lambda line: None), initial=base)
    del base
    trainer.model.train()
    lr = checked.cfg.optim.learning_rate
    return (lambda i: trainer.step(i, lr) and None), trainable_params(trainer.model)


def hf_config(shape: str, training: bool) -> Any:
    """The shape as the model's own Transformers config (what its config.json says)."""
    from transformers import LlamaConfig, Qwen3Config

    s = ALL_SHAPES[shape]
    kw = dict(vocab_size=s["vocab_size"], hidden_size=s["n_embd"], intermediate_size=s["mlp_width"],
              num_hidden_layers=s["n_layer"], num_attention_heads=s["n_head"], num_key_value_heads=s["n_kv_head"],
              head_dim=s.get("head_size") or s["n_embd"] // s["n_head"], max_position_embeddings=s["block_size"],
              rms_norm_eps=s["norm_eps"], rope_parameters={"rope_type": "default", "rope_theta": s["rope_theta"]},
              hidden_act="silu", attention_bias=False, tie_word_embeddings=True, use_cache=not training,
              attn_implementation="sdpa")
    return Qwen3Config(**kw) if s.get("qk_norm") else LlamaConfig(mlp_bias=False, **kw)


def hf_model(shape: str, training: bool) -> Any:
    """LlamaForCausalLM / Qwen3ForCausalLM of the shape, random init, float32."""
    import torch
    from transformers import LlamaForCausalLM, Qwen3ForCausalLM

    cfg = hf_config(shape, training)
    torch.manual_seed(0)
    model = (Qwen3ForCausalLM if cfg.model_type == "qwen3" else LlamaForCausalLM)(cfg)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def hf_step(shape: str, data_dir: Path, context: int, dtype: str) -> tuple[Step, int]:
    """Transformers + peft's own loop: forward with labels, backward, AdamW step, zero_grad; (step(i), trainable)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf_model(shape, training=True),
                           LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                                      task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # the finetune-lora preset's optimizer settings (pocketgpt's side runs them too)
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.01)
    batch = windows(data_dir, context, seed=1)

    def step(i: int) -> None:
        x = batch(i)
        with autocast(dtype):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return step, sum(p.numel() for p in params)


def pocketgpt_name(base_dtype: str) -> str:
    """A pocketgpt contender's name: its lora_base_dtype unless auto."""
    return POCKETGPT if base_dtype == "auto" else f"{POCKETGPT}, {base_dtype} base"


def make_step(who: str, shape: str, data_dir: Path, out: Path, context: int, dtype: str) -> tuple[Step, int]:
    if who.startswith(POCKETGPT):
        base_dtype = who.removeprefix(POCKETGPT + ", ").removesuffix(" base") if who != POCKETGPT else "auto"
        return pocketgpt_step(shape, data_dir, out, context, dtype, base_dtype)
    return hf_step(shape, data_dir, context, dtype)


# --------------------------------------------------------------------------- train: interleaved step times


def time_training(shape: str, data_dir: Path, tmp: Path, args: Any) -> list[dict[str, Any]]:
    steps: dict[str, Step] = {}
    trainable: dict[str, int] = {}
    for who in [*(pocketgpt_name(b) for b in args.lora_base_dtypes.split(",")), HF]:
        steps[who], trainable[who] = make_step(who, shape, data_dir, tmp / f"run-{shape}-{len(steps)}", args.context,
                                               args.dtype)

    def contender(step: Step) -> Step:
        def run(r: int) -> None:  # round -1: the warm-up steps; round r: args.steps steps
            first, count = (0, args.warmup) if r < 0 else (100 + r * args.steps, args.steps)
            for i in range(first, first + count):
                step(i)
        return run

    seconds = interleaved({who: contender(s) for who, s in steps.items()}, args.rounds)
    ms = {who: [s / args.steps * 1000 for s in ss] for who, ss in seconds.items()}
    rows = [{"shape": shape, "who": who, "trainable": trainable[who], "ms": ms[who],
             "speedup": common.median_ratio(ms[HF], ms[who]) if who != HF else 1.0} for who in steps]
    del steps
    gc.collect()
    return rows


def train_table(rows: list[dict[str, Any]], context: int) -> str:
    lines = ["| shape | contender | trainable | ms/step (median) | tokens/s | per round (ms) | "
             "pocketgpt speed / theirs |", "|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        ms = statistics.median(r["ms"])
        lines.append(f"| {r['shape']} | {r['who']} | {r['trainable'] / 1e6:.2f}M | {ms:,.0f} | "
                     f"{context / ms * 1000:,.0f} | "
                     f"{', '.join(f'{x:,.0f}' for x in r['ms'])} | "
                     f"{'**%.2fx**' % r['speedup'] if r['who'] != HF else ''} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- rss: one child per run


def rss_child(who: str, shape: str, data_dir: Path, out: Path, context: int, dtype: str, steps: int) -> dict[str, Any]:
    """In a child: import, build, `steps` steps; the memory at each point and the step times."""
    import torch  # noqa: F401 - both contenders import it; counted in "imports"

    if who.startswith(POCKETGPT):
        import pocketgpt.trainer  # noqa: F401
    else:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    got: dict[str, Any] = {"imports": status_mb("VmRSS")}
    step, got["trainable"] = make_step(who, shape, data_dir, out, context, dtype)
    got["built"] = status_mb("VmRSS")
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    got.update(peak=status_mb("VmHWM"), step_s=times)
    return got


def run_child(*args: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise common.failed(cmd, res.returncode, res.stderr)
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure_rss(shape: str, data_dir: Path, tmp: Path, args: Any) -> list[dict[str, Any]]:
    runs: dict[str, list[dict[str, Any]]] = {POCKETGPT: [], HF: []}
    for rep in range(args.repeats):  # contenders alternating
        for who in runs:
            got = run_child(who, shape, str(data_dir), str(tmp / f"rss-{shape}-{rep}"), str(args.context),
                            args.dtype, str(args.rss_steps))
            runs[who].append(got)
            print(json.dumps({"rss": shape, "who": who, **got}), file=sys.stderr, flush=True)
    rows = [{"shape": shape, "who": who, "runs": rs, **{k: statistics.median(r[k] for r in rs)
                                                         for k in ("imports", "built", "peak")}}
            for who, rs in runs.items()]
    rows[0]["ratio"] = common.median_ratio([r["peak"] for r in runs[POCKETGPT]], [r["peak"] for r in runs[HF]])
    return rows


def rss_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| shape | contender | RSS after imports | RSS with the model built | peak RSS (VmHWM) | "
             "peak over the imports | peaks of the runs | pocketgpt peak / theirs |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        peaks = ", ".join(f"{x['peak']:,.0f}" for x in r["runs"])
        lines.append(f"| {r['shape']} | {r['who']} | {r['imports']:,.0f} MB | {r['built']:,.0f} MB | "
                     f"**{r['peak']:,.0f} MB** | {r['peak'] - r['imports']:,.0f} MB | {peaks} | "
                     f"{'**%.2fx**' % r['ratio'] if 'ratio' in r else ''} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- profile: where a step's time goes

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


@contextlib.contextmanager
def phase_clock() -> Any:
    """Seconds spent in the outermost module forward (the loss included), in torch.autograd.backward and in
    optimizer steps while inside, summed; global hooks, so both contenders are clocked by the same code."""
    import torch
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    spent = {"forward (loss included)": 0.0, "backward": 0.0, "optimizer step": 0.0}
    depth, started = [0], {}

    def fwd_pre(module: Any, inputs: Any) -> None:
        if depth[0] == 0:
            started["f"] = time.perf_counter()
        depth[0] += 1

    def fwd_post(module: Any, inputs: Any, output: Any) -> None:
        depth[0] -= 1
        if depth[0] == 0:
            spent["forward (loss included)"] += time.perf_counter() - started.pop("f")

    def opt_pre(opt: Any, a: Any, k: Any) -> None:
        started[id(opt)] = time.perf_counter()

    def opt_post(opt: Any, a: Any, k: Any) -> None:
        spent["optimizer step"] += time.perf_counter() - started.pop(id(opt))

    real_backward = torch.autograd.backward

    def backward(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real_backward(*a, **k)
        finally:
            spent["backward"] += time.perf_counter() - t0

    hooks = [register_module_forward_pre_hook(fwd_pre), register_module_forward_hook(fwd_post),
             register_optimizer_step_pre_hook(opt_pre), register_optimizer_step_post_hook(opt_post)]
    torch.autograd.backward = backward  # Tensor.backward calls it by this name
    try:
        yield spent
    finally:
        torch.autograd.backward = real_backward
        for h in hooks:
            h.remove()


def profile_training(shape: str, data_dir: Path, tmp: Path, args: Any) -> str:
    """Per contender, after args.warmup steps: args.rounds steps clocked by phase (medians), then one step under
    torch.profiler: the matmuls' share of the ops' self CPU time and the top ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    phases, ops = [], []
    for who in (POCKETGPT, HF):
        step, _ = make_step(who, shape, data_dir, tmp / f"prof-{shape}", args.context, args.dtype)
        for i in range(args.warmup):
            step(i)
        rounds = []
        for r in range(args.rounds):
            with phase_clock() as spent:
                t0 = time.perf_counter()
                step(100 + r)
                total = time.perf_counter() - t0
            rounds.append({**spent, "the rest (data, clipping, zero_grad, loss read)": total - sum(spent.values()),
                           "step": total})
        med = common.medians(rounds)
        phases.append(f"| {shape} | {who} | " + " | ".join(f"{v:.2f}" for v in med.values()) + " |")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(1000)
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        op_s = sum(e.self_cpu_time_total for e in events) / 1e6
        mm = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e6
        mm_calls = sum(e.count for e in events if e.key in MATMULS)
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top_ops]
        ops.append(f"{shape}, {who}: ops' self CPU time {op_s:.2f} s in one profiled step, matmuls {mm:.2f} s "
                   f"({mm / op_s:.0%}, {mm_calls} calls); top: "
                   + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e6:.2f} s ({e.count})" for e in top))
        del step
        gc.collect()
    head = ("| shape | contender | " + " | ".join(rounds[0]) + " |\n|---|---|" + "---:|" * len(rounds[0]))
    return f"\nWhere a step's time goes: seconds, medians of {args.rounds} steps\n\n{head}\n" + "\n".join(phases) \
        + "\n\n" + "\n".join(ops)


def bandwidth_note(shape: str) -> str:
    """What one decode step has to read (every weight once, float32) and how fast this CPU streams a matrix
    that size through a matrix-vector product on 1 and 2 threads: the floor under a one-stream step."""
    import torch

    from pocketgpt.config import ModelConfig

    cfg = ModelConfig(**ALL_SHAPES[shape])
    m = torch.randn(cfg.vocab_size, cfg.n_embd)  # the tied embedding / output head: the largest matrix
    v = torch.randn(cfg.n_embd)
    got = []
    for t in (1, 2):
        with common.threads(t), torch.inference_mode():
            for _ in range(2):
                torch.mv(m, v)
            t0 = time.perf_counter()
            for _ in range(5):
                torch.mv(m, v)
            got.append(m.numel() * 4 * 5 / (time.perf_counter() - t0) / 1e9)
    return (f"matrix-vector product over the {cfg.vocab_size} x {cfg.n_embd} head (float32, "
            f"{m.numel() * 4 / 1e6:,.0f} MB): {got[0]:.1f} GB/s on 1 thread, {got[1]:.1f} GB/s on 2")


# --------------------------------------------------------------------------- llama.cpp beside them (optional)

# Runs in the interpreter that has llama-cpp-python (argv: gguf path, n_ctx, thread counts); per stdin line
# "THREADS N ID ID ...": a greedy generation of N new ids after the prompt ids, the KV cache started afresh
# (reset: no prompt reuse); one JSON line back.
LLAMA_CHILD = """
import json, sys
import llama_cpp
path, n_ctx, threads = sys.argv[1], int(sys.argv[2]), [int(t) for t in sys.argv[3].split(",")]
llms = {t: llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=t, n_threads_batch=t, verbose=False)
        for t in threads}
print(json.dumps({"version": llama_cpp.__version__}), flush=True)
for line in sys.stdin:
    t, n, *prompt = (int(x) for x in line.split())
    llm = llms[t]
    llm.reset()
    ids = []
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        ids.append(int(tok))
        if len(ids) == n:
            break
    print(json.dumps(ids), flush=True)
"""


class LlamaCpp:
    """llama.cpp (llama-cpp-python in another interpreter) over a GGUF export of the same weights, one stream,
    greedy; a child process that stays up between generations, so rounds interleave with the others'."""

    def __init__(self, python: str, gpt: Any, shape: str, tmp: Path, n_ctx: int, threads: list[int]):
        from pocketgpt.gguf_export import export_gguf

        path = tmp / f"{shape}.gguf"
        export_gguf(gpt, own_tokenizer(ALL_SHAPES[shape]["vocab_size"]), path, dtype="f16", overwrite=True)
        self.proc = subprocess.Popen([python, "-c", LLAMA_CHILD, str(path), str(n_ctx), ",".join(map(str, threads))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.version = json.loads(self._line())["version"]

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the llama.cpp child ended (exit {self.proc.wait()})")
        return line

    def generate(self, threads: int, prompt: list[int], n: int) -> list[int]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(map(str, [threads, n, *prompt])) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


def llama_python(choice: str) -> str | None:
    """The interpreter to run llama.cpp in: --llamacpp's, if llama_cpp imports there; else None (no row)."""
    if choice == "none":
        return None
    res = subprocess.run([choice, "-c", "import llama_cpp"], capture_output=True)
    return choice if res.returncode == 0 else None


# --------------------------------------------------------------------------- generate


def generation(shape: str, args: Any) -> tuple[list[dict[str, Any]], list[str]]:
    import torch

    from pocketgpt.config import ModelConfig
    from pocketgpt.engine import Engine
    from pocketgpt.hf import state_to_hf
    from pocketgpt.model import GPT

    torch.manual_seed(0)
    gpt = GPT(ModelConfig(**ALL_SHAPES[shape])).eval()
    engine = Engine(gpt)  # decode_dtype auto: what `pocketgpt sample` and the server use
    hf = hf_model(shape, training=False).eval()
    with torch.no_grad():
        missing, unexpected = hf.load_state_dict(state_to_hf(gpt), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)  # lm_head: tied
    notes = []
    prompt = torch.randint(0, ALL_SHAPES[shape]["vocab_size"], (args.prompt_tokens,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        diff = float((hf(ids).logits - gpt(ids)[0]).abs().max())
    notes.append(f"max |logit diff| transformers vs pocketgpt on the {len(prompt)}-token prompt: {diff:.2e}")
    n = args.new_tokens
    default_threads = torch.get_num_threads()
    hf_threads = sorted({default_threads, 1}, reverse=True)

    def hf_gen(streams: int, threads: int) -> Callable[[int], Any]:
        def run(seed: int) -> Any:
            torch.manual_seed(seed)
            sampling = (dict(do_sample=True, temperature=0.8, top_k=0, top_p=1.0) if streams > 1
                        else dict(do_sample=False))
            with common.threads(threads), torch.inference_mode():
                out = hf.generate(torch.tensor([prompt] * streams), max_new_tokens=n, min_new_tokens=n, use_cache=True,
                                  pad_token_id=0, **sampling)
            return out[:, len(prompt):].tolist()
        return run

    def ours(streams: int) -> Callable[[int], Any]:
        if streams == 1:
            return lambda seed: engine.generate(prompt, n, temperature=0)
        return lambda seed: engine.generate(prompt, n, temperature=0.8, seed=seed, num_samples=streams)

    contenders: dict[tuple[int, str], Callable[[int], Any]] = {}
    for streams in args.streams:
        contenders[(streams, "pocketgpt engine")] = ours(streams)
        for t in hf_threads:
            contenders[(streams, f"transformers generate, {t} thread{'s' if t > 1 else ''}")] = hf_gen(streams, t)
    llama = None
    python = llama_python(args.llamacpp) if 1 in args.streams else None
    if python:
        llama = LlamaCpp(python, gpt, shape, args.tmp, len(prompt) + n, hf_threads)
        for t in hf_threads:
            contenders[(1, f"llama.cpp {llama.version} (f16 GGUF), {t} thread{'s' if t > 1 else ''}")] = \
                lambda seed, t=t: [llama.generate(t, prompt, n)]
    elif 1 in args.streams:
        notes.append(f"llama.cpp: no row (llama_cpp does not import in {args.llamacpp})")
    if 1 in args.streams:  # greedy: the same ids?
        ours_ids = contenders[(1, "pocketgpt engine")](0)[0]
        others = {"transformers'": hf_gen(1, default_threads)(0)[0]}
        if llama is not None:
            others["llama.cpp's"] = llama.generate(hf_threads[0], prompt, n)
        for who, theirs in others.items():
            same = sum(x == y for x, y in zip(ours_ids, theirs))
            first = next((i for i, (x, y) in enumerate(zip(ours_ids, theirs)) if x != y), None)
            notes.append(f"greedy, 1 stream: {same} of {n} new ids the same as {who} (first difference at {first})")
    seconds = interleaved({f"{k[0]}|{k[1]}": fn for k, fn in contenders.items()}, args.rounds)
    notes.append(f"pocketgpt engine: decode steps in {str(engine.step_dtype).removeprefix('torch.')}, "
                 f"{engine.threads or default_threads} thread(s) (its own choice); auto's probe: "
                 f"{engine.logit_diffs or 'not run'}")
    weights_gb = sum(p.numel() * p.element_size() for p in gpt.parameters()) / 1e9
    notes.append(bandwidth_note(shape))
    rows = []
    for streams in args.streams:
        tps = {who: [streams * n / s for s in seconds[f"{streams}|{who}"]] for (st, who) in contenders if st == streams}
        best_hf = [max(v[r] for w, v in tps.items() if w.startswith("transformers")) for r in range(args.rounds)]
        for who, v in tps.items():
            rows.append({"streams": streams, "who": who, "tps": v, "gb_s": statistics.median(v) / streams * weights_gb,
                         "vs": common.median_ratio(tps["pocketgpt engine"], v) if who != "pocketgpt engine" else None,
                         "vs_best": common.median_ratio(v, best_hf) if who == "pocketgpt engine" else None})
    if llama is not None:
        llama.close()
    del hf, gpt, engine
    gc.collect()
    return rows, notes


def generate_table(rows: list[dict[str, Any]], shape: str, prompt: int, n: int) -> str:
    lines = [f"| {shape}: streams | contender | tokens/s (all streams, median) | per round | weights read | "
             "pocketgpt / this one (median of rounds) |", "|---:|---|---:|---|---:|---:|"]
    for r in rows:
        ratio = f"{r['vs']:.2f}x" if r["vs"] is not None else f"**{r['vs_best']:.2f}x** vs the faster transformers"
        lines.append(f"| {r['streams']} | {r['who']} | {statistics.median(r['tps']):.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in r['tps'])} | {r['gb_s']:.1f} GB/s | {ratio} |")
    return "\n".join(lines) + (f"\n\n{prompt}-token prompt, {n} new tokens per stream; weights read: every float32 "
                               "weight once per decode step (steps/s x the weights' bytes)")


# --------------------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        who, shape, data, out, context, dtype, steps = sys.argv[2:9]
        print(json.dumps(rss_child(who, shape, Path(data), Path(out), int(context), dtype, int(steps))))
        return
    ap = common.parser(__doc__)
    ap.add_argument("--parts", default="train,rss,generate")
    ap.add_argument("--shapes", default="smollm2-135m,qwen3-0.6b", help="train and rss")
    ap.add_argument("--generate-shape", default="qwen3-0.6b")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="float32, or bf16 autocast for both (only where the CPU has bf16 instructions)")
    ap.add_argument("--lora-base-dtypes", default="auto",
                    help="train: pocketgpt contenders by lora_base_dtype, comma-separated (auto, float32, bfloat16)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each contender first")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1, help="steps per contender per round")
    ap.add_argument("--repeats", type=int, default=3, help="rss: child runs per contender")
    ap.add_argument("--rss-steps", type=int, default=3)
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--generate-rounds", type=int, default=3)
    ap.add_argument("--llamacpp", default=sys.executable,
                    help="an interpreter with llama-cpp-python (default: this one): llama.cpp beside them at 1 "
                         "stream; none: no row")
    ap.add_argument("--top-ops", type=int, default=8, help="profile: ops listed per contender")
    ap.add_argument("--tiny", action="store_true", help="smoke test: tiny shapes, context 64, few tokens")
    args = ap.parse_args()
    if args.tiny:
        args.shapes, args.generate_shape, args.context = "tiny-llama,tiny-qwen3", "tiny-qwen3", 64
        args.rounds, args.repeats, args.new_tokens, args.generate_rounds = 2, 1, 8, 2
    args.streams = [int(s) for s in args.streams.split(",")]
    parts = args.parts.split(",")

    import peft
    import torch
    import transformers

    header = (f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
              f"{torch.get_num_threads()} threads, dtype {args.dtype}")
    print(header, flush=True)
    out: list[str] = []
    with common.scratch() as tmp:
        data = {shape: prepare_data(shape, tmp / shape) for shape in args.shapes.split(",")} \
            if {"train", "rss", "profile"} & set(parts) else {}
        if "train" in parts:
            rows = [r for shape in data for r in time_training(shape, data[shape], tmp, args)]
            out += [f"\nLoRA fine-tuning step, batch 1, context {args.context}, rank {RANK} on {', '.join(TARGETS)}; "
                    f"{args.warmup} warm-up steps, then {args.rounds} rounds x {args.steps} step(s), interleaved\n",
                    train_table(rows, args.context)]
            print("\n".join(out[-2:]), flush=True)
        if "rss" in parts:
            rows = [r for shape in data for r in measure_rss(shape, data[shape], tmp, args)]
            out += [f"\nPeak memory: each fine-tune in a child process of its own, {args.rss_steps} steps, medians of "
                    f"{args.repeats}\n", rss_table(rows)]
            print("\n".join(out[-2:]), flush=True)
        if "generate" in parts:
            g = argparse_copy(args, rounds=args.generate_rounds, tmp=tmp)
            rows, notes = generation(args.generate_shape, g)
            out += [f"\nGeneration, float32 weights, {args.generate_rounds} interleaved rounds\n",
                    generate_table(rows, args.generate_shape, args.prompt_tokens, args.new_tokens), *notes]
            print("\n".join(out[-3 - len(notes):]), flush=True)
        if "profile" in parts:
            for shape in data:
                out.append(profile_training(shape, data[shape], tmp, args))
                print(out[-1], flush=True)
    print("\n" + header)
    print("\n".join(out))


def argparse_copy(args: Any, **changes: Any) -> Any:
    import argparse

    return argparse.Namespace(**{**vars(args), **changes})


if __name__ == "__main__":
    main()
