"""llama.cpp's logits, tokens and greedy ids against pocketgpt's, for every family `export --format gguf` writes.

    pip install llama-cpp-python              # compiles llama.cpp (10+ minutes on 2 cores); not a pocketgpt dependency
    python bench/gguf_llamacpp.py             # ~20 min on 2 busy cores, most of it training six tiny models
    python bench/gguf_llamacpp.py --only folders   # the Hugging Face folders alone, ~1 min (--only runs,folders ...)
    python bench/gguf_llamacpp.py --only chat      # pocketgpt's turn tokens and chat template, ~1 min

Rows, each exported as GGUF and loaded by llama.cpp:
- GPT-2 (llama.cpp's gpt2): tiny models trained here on the bundled corpus with a byte-level BPE of
  their own (the char tokenizer cannot go to GGUF), once with pocketgpt's default exact GELU and once
  with GPT-2's tanh GELU ("gelu_new", what llama.cpp's gpt2 computes); and a randomly initialised
  model of GPT-2 small's shape with GPT-2's tokenizer (LayerNorms and biases randomised too, so a
  mapping mistake there would show), written as f32 and as f16.
- pocketgpt runs of each other family's shape, trained here like the tiny GPT-2s: Llama (rotary
  positions, RMSNorm, SwiGLU, grouped-query attention, untied head) -> llama; the same with biases on
  q, k and v (tied) -> qwen2; with learned QK-norm gains and a head size apart from n_embd / n_head
  -> qwen3; and Llama 3's rotary scaling with an original context of 32, scored over 128 positions
  (llama.cpp computes it from the rope_freqs tensor).
- Hugging Face folders (transformers' random Qwen2, Qwen3 and Llama, norms and biases randomised, the
  final norm's gains scaled up so the logits have clear winners) carrying their own byte-level
  tokenizer.json, trained here with `tokenizers`: Qwen's split (llama.cpp's pre "qwen2"), Llama 3's
  (pre "llama-bpe", with a start token and Llama 3's rotary scaling) and SmolLM2's (pre "smollm"),
  imported with pocketgpt.load; and a SentencePiece-style BPE (TinyLlama's layout: the word mark for
  spaces, <0xNN> byte tokens, <s> first), which goes to llama.cpp's "llama" tokenizer model.

llama.cpp runs with its defaults (an f16 KV cache) except in the rows that say "KV cache f32".
Columns: llama.cpp's architecture and pre-tokenizer as it read them from the file; max |logit
difference| over the 128 scored positions (and the largest |logit|, for scale); the share of
positions whose most likely next token is the same; whether llama.cpp's tokenizer gives pocketgpt's
ids for a mixed text (accents, emoji, CJK, code, newlines, digits; the start token pocketgpt puts
before a prompt too; in brackets, how many ids); and whether 32 greedy tokens from a 16-id prompt
are the same ids (llama.cpp's own greedy sampler, one token at a time through its KV cache;
pocketgpt's engine in float32). Below the table: for the rows with Llama 3's scaling, the logit
difference past the original context beside how far the scaling moves those logits; any
disagreement, where it starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, wherever this is started from
import common  # noqa: E402

TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=128, max_iters=300, eval_interval=300, batch_size=16,
            max_time=0)
TOKENIZER_TEXT = "  odd   spacing\n\n\tand Ünïcode 数字 123,456 <|endoftext|> don't"
# what a tokenizer's split meets in the wild: accents, emoji (one joined by ZWJ), CJK, Hangul, Greek,
# Cyrillic, code with tabs and indentation, runs of digits, CRLF and blank lines
MIXED = ("Crème brûlée, naïve café — déjà vu!\n\n"
         "def add(a, b):\n    return a + b  # ✓ 🚀🎉👩‍💻\n"
         "北京欢迎你。東京タワー、서울 특별시\n"
         "Ελληνικά и русский текст.\r\n"
         "x = [1, 22, 333, 4444, 55555]\t\t// 3.14159\n\n\n"
         "   leading spaces and 'quotes' don't    stop   ")
GREEDY_PROMPT, GREEDY_NEW = 16, 32

# pocketgpt runs of the other families' shapes (the model options of `pocketgpt train`)
LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_head=4, n_kv_head=2, mlp_width=160, rope_theta=5e5,
             tie_embeddings=False)
ORIGINAL_CONTEXT = 32  # Llama 3's scaling, in the runs and folders that have it: positions 32..127 are past it
FAMILY_RUNS = [
    ("llama-shaped run: rope, RMSNorm, SwiGLU, GQA 4/2, untied", LLAMA),
    ("qwen2-shaped run: + qkv_bias, tied", {**LLAMA, "qkv_bias": True, "tie_embeddings": True}),
    ("qwen3-shaped run: + QK-norm gains, head size 24", {**LLAMA, "qk_norm": True, "qk_norm_gains": True,
                                                         "head_size": 24}),
    (f"llama-shaped run, llama3 rope scaling (original context {ORIGINAL_CONTEXT})",
     {**LLAMA, "rope_scaling": "llama3", "rope_factor": 4.0, "rope_original_context": ORIGINAL_CONTEXT}),
]
HF_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
HEAD_GAIN = 40.0  # the random folders' final-norm gains times this: logits of ~10, not ~0.2
HF_VOCAB = 1024  # the model's rows, more than the tokenizer's ids (as Qwen's embedding has)


@dataclasses.dataclass
class Case:
    label: str
    model: Any  # pocketgpt's GPT
    tok: Any
    ids: list[int]  # the positions scored
    text: str  # the tokenizer check's text
    dtype: str = "f32"
    kv_f32: bool = False
    past: int = 0  # Llama 3's scaling: the original context, past which the scaling's effect is measured


# --------------------------------------------------------------------------- the models


def random_gpt2_small(block_size: int, seed: int = 0) -> Any:
    from pocketgpt.config import ModelConfig
    from pocketgpt.model import GPT

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=common.GPT2_VOCAB, block_size=block_size, bias=True, mlp="gelu_new",
                      **common.GPT2_SMALL_SHAPE)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.normal_(0.0, 0.1).add_(1.0 if name.endswith("weight") else 0.0)
    return model


def train_tiny(root: Path, data: Path, name: str, **model: Any) -> Path:
    run = root / name
    common.train(data, run, *common.flags(**{**TINY, **model}), *common.QUIET, *common.NO_PLOTS)
    return run


def hf_tokenizer(pre: str, texts: list[str], bos: bool) -> Any:
    """A byte-level BPE as a pretrained model's tokenizer.json has it, learnt from texts: Qwen2's split
    (pre "qwen2") or Llama 3's (pre "llama-bpe": whole words found in the vocabulary taken as they are,
    its ignore_merges) by their published patterns, then bytes to stand-ins; or SmolLM2's (pre "smollm":
    single digits, then GPT-2's byte-level split). bos: a start token before every text (Llama 3's)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from pocketgpt.gguf_export import LLAMA3_SPLIT, QWEN2_SPLIT

    if pre == "sentencepiece":
        return sentencepiece_tokenizer(texts)
    start = ["<|begin_of_text|>"] if bos else []
    tk = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    if pre == "smollm":
        steps = [pre_tokenizers.Digits(individual_digits=True),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    else:
        split = {"qwen2": QWEN2_SPLIT, "llama-bpe": LLAMA3_SPLIT}[pre]
        steps = [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *start]
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    if bos:
        b = tk.token_to_id(start[0])
        tk.post_processor = processors.TemplateProcessing(single=f"{start[0]} $A", pair=f"{start[0]} $A $B",
                                                          special_tokens=[(start[0], b)])
    return tk


def sentencepiece_tokenizer(texts: list[str]) -> Any:
    """A SentencePiece-style BPE as TinyLlama's tokenizer.json has it: spaces as the word mark U+2581 (one put
    before the text), <0xNN> tokens for the bytes of characters the vocabulary lacks, <s> before every text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    mark = "\u2581"
    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend(mark), normalizers.Replace(" ", mark)])
    tk.decoder = decoders.Sequence([decoders.Replace(mark, " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    # limit_alphabet: the rarer characters of the mixed text stay out of the vocabulary (their bytes' tokens serve)
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=900, special_tokens=specials, limit_alphabet=120,
                                                      show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return tk


def hf_folder(folder: Path, kind: str, tk: Any, bos: bool, seed: int = 0, **config: Any) -> Path:
    """A random transformers model of `kind` with tokenizer tk, saved as a Hugging Face folder."""
    import transformers

    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}
    config_cls, model_cls = classes[kind]
    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar per folder
    torch.manual_seed(seed)
    m = model_cls(config_cls(vocab_size=HF_VOCAB, **{**HF_SHAPE, **config}))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:  # every RMSNorm's gains (Qwen3's q_norm / k_norm too)
                p.normal_(1.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "q_proj" in name or "k_proj" in name:  # sharper attention, so positions move the logits
                p.normal_(0.0, 0.3)
        m.model.norm.weight.mul_(HEAD_GAIN)
    m.save_pretrained(str(folder))
    spm = tk.token_to_id("</s>") is not None
    eos, start = ("</s>", "<s>") if spm else ("<|endoftext|>", "<|begin_of_text|>")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, bos_token=start if bos else None)
    fast.save_pretrained(str(folder))
    ends = [tk.token_to_id(eos)] + ([] if spm else [tk.token_to_id("<|im_end|>")])
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ends}))
    return folder


# --------------------------------------------------------------------------- the comparison


def pocketgpt_greedy(model: Any, prompt: list[int]) -> list[int]:
    from pocketgpt.engine import Engine

    return Engine(model, decode_dtype="float32").generate(prompt, GREEDY_NEW, temperature=0.0)[0]


def llama_greedy(llm: Any, prompt: list[int]) -> list[int]:
    llm.reset()
    out: list[int] = []
    for t in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(t))
        if len(out) == GREEDY_NEW:
            break
    return out


def first_difference(a: list[int], b: list[int]) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at {at} of {len(a)}/{len(b)}: {a[at:at + 4]} vs {b[at:at + 4]}"


def compare(case: Case, path: Path) -> dict[str, Any]:
    """Export, run llama.cpp over the case's ids, its text and a greedy generation, and line each up
    with pocketgpt's."""
    import llama_cpp

    from pocketgpt.gguf_export import export_gguf
    from pocketgpt.loading import prompt_ids

    model, tok, ids = case.model.eval(), case.tok, case.ids
    export_gguf(model, tok, path, dtype=case.dtype, overwrite=True)
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if case.kv_f32 else {}
    n_ctx = max(len(ids), GREEDY_PROMPT + GREEDY_NEW)
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                          n_threads=os.cpu_count() or 1, **kv)
    meta = llm.metadata
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)  # a copy: the greedy run below reuses the rows
    with torch.inference_mode():
        ours = model(torch.tensor([ids]))[0][0].float().numpy()
    # a pretrained model's tokenizer reads special tokens written in the text (as transformers' does), and so do
    # pocketgpt's turn tokens; the gpt2 and bpe kinds take <|endoftext|> as plain text
    special = tok.kind == "hf" or hasattr(tok, "chat_tokens")
    data = case.text.encode("utf-8")
    plain = (llm.tokenize(data, add_bos=False, special=special), tok.encode(case.text))
    prompt = (llm.tokenize(data, add_bos=True, special=special), prompt_ids(tok, case.text))
    start = prompt[1][:GREEDY_PROMPT]
    greedy = (llama_greedy(llm, start), pocketgpt_greedy(model, start))
    notes = [f"tokens ({w}): {first_difference(*pair)}" for w, pair in (("plain", plain), ("prompt", prompt))
             if pair[0] != pair[1]]
    notes += [f"greedy: {first_difference(*greedy)}"] if greedy[0] != greedy[1] else []
    flipped = np.flatnonzero(theirs.argmax(-1) != ours.argmax(-1))
    if len(flipped):  # how close pocketgpt's own first and second choices were there
        top2 = np.sort(ours[flipped], axis=-1)[:, -2:]
        gaps = ", ".join(f"{g:.1e}" for g in top2[:, 1] - top2[:, 0])
        notes.append(f"top-1 differs at position(s) {flipped.tolist()}, where pocketgpt's two most likely tokens "
                     f"are {gaps} apart")
    out = {"arch": meta.get("general.architecture", "?"), "pre": meta.get("tokenizer.ggml.pre", "?"),
           "diff": float(np.abs(theirs - ours).max()), "scale": float(np.abs(ours).max()),
           "top1": float((theirs.argmax(-1) == ours.argmax(-1)).mean()),
           "tokens_agree": plain[0] == plain[1] and prompt[0] == prompt[1], "greedy_equal": greedy[0] == greedy[1],
           "bytes": path.stat().st_size, "notes": notes, "n_tokens": len(plain[1])}
    if hasattr(tok, "chat_tokens"):  # the template inside the GGUF, rendered by llama-cpp-python, is pocketgpt's
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from pocketgpt.chat import chat_prompt

        theirs_prompt = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token="<|end|>", bos_token="")(
            messages=CHAT_MESSAGES).prompt
        out["template_equal"] = theirs_prompt == tok.decode(chat_prompt(tok, CHAT_MESSAGES).prompt)
        if not out["template_equal"]:
            notes.append(f"chat template: llama-cpp-python renders {theirs_prompt[:80]!r}")
    if case.past:  # the scaling's own effect past the original context, and llama.cpp's difference there
        from pocketgpt.model import GPT

        unscaled = GPT.from_state(dataclasses.replace(model.config, rope_scaling="none"),
                                  dict(model.state_dict())).eval()
        with torch.inference_mode():
            plain_rope = unscaled(torch.tensor([ids]))[0][0].float().numpy()
        out["past"] = (float(np.abs(theirs - ours)[case.past:].max()),
                       float(np.abs(plain_rope - ours)[case.past:].max()))
    del llm
    path.unlink()
    return out


# --------------------------------------------------------------------------- the rows


def gpt2_cases(root: Path, data: Path, corpus: str, text: str, tokens: int) -> list[Case]:
    import pocketgpt
    from pocketgpt.tokenizer import GPT2Tokenizer

    out = []
    for mlp in ("gelu", "gelu_new"):
        lm = pocketgpt.load(train_tiny(root, data, f"tiny-{mlp}", mlp=mlp))
        ids = lm.tokenizer.encode(corpus[-20_000:])[: min(tokens, lm.block_size)]
        label = f"gpt2: tiny trained, bpe 512, {mlp}"
        out.append(Case(label, lm.model, lm.tokenizer, ids, text))
        if mlp == "gelu_new":  # how much of the difference is llama.cpp's f16 KV cache
            out.append(Case(label + ", KV cache f32", lm.model, lm.tokenizer, ids, text, kv_f32=True))
    model, tok = random_gpt2_small(tokens), GPT2Tokenizer()
    ids = torch.randint(0, common.GPT2_VOCAB, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    out += [Case("gpt2: random GPT-2 small, gpt2 tokenizer", model, tok, ids, text, dtype=d) for d in ("f32", "f16")]
    return out


def family_run_cases(root: Path, data: Path, corpus: str, text: str, tokens: int) -> list[Case]:
    import pocketgpt

    out = []
    for i, (label, opts) in enumerate(FAMILY_RUNS):
        lm = pocketgpt.load(train_tiny(root, data, f"family-{i}", **opts))
        ids = lm.tokenizer.encode(corpus[-20_000:])[: min(tokens, lm.block_size)]
        past = ORIGINAL_CONTEXT if opts.get("rope_scaling") == "llama3" else 0
        out.append(Case(label + ", bpe 512", lm.model, lm.tokenizer, ids, text, past=past))
        if past:  # how much of the difference is llama.cpp's f16 KV cache
            out.append(Case(label + ", bpe 512, KV cache f32", lm.model, lm.tokenizer, ids, text, kv_f32=True,
                            past=past))
    return out


def hf_folder_cases(root: Path, corpus: str, tokens: int) -> list[Case]:
    import pocketgpt

    # the tokenizers learn from Shakespeare and bits of the mixed text; they are checked on the whole of
    # it, a chat turn's control tokens and Shakespeare they did not see
    learn = [corpus[:60_000], MIXED[::2], MIXED[1::2]]
    text = MIXED + "\n<|im_start|>user\nhi there<|im_end|>\n" + corpus[-1500:]
    llama3_rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": ORIGINAL_CONTEXT, "rope_theta": 5e5}
    folders = [
        ("Qwen2 folder, own tokenizer (Qwen's split)", "qwen2", "qwen2", False, {"tie_word_embeddings": True}),
        ("Qwen3 folder, own tokenizer (Qwen's split), head_dim 32", "qwen3", "qwen2", False,
         {"head_dim": 32, "tie_word_embeddings": False}),
        (f"Llama folder, own tokenizer (Llama 3's split, start token), llama3 rope scaling "
         f"(original context {ORIGINAL_CONTEXT})", "llama", "llama-bpe", True,
         {"tie_word_embeddings": True, "rope_parameters": llama3_rope}),
        ("Llama folder, own tokenizer (SmolLM2's split)", "llama", "smollm", False, {"tie_word_embeddings": True}),
        ("Llama folder, own SentencePiece-style tokenizer (TinyLlama's: byte fallback, <s> first)", "llama",
         "sentencepiece", True, {"tie_word_embeddings": False}),
    ]
    out = []
    for i, (label, kind, pre, bos, config) in enumerate(folders):
        tk = hf_tokenizer(pre, learn, bos)
        lm = pocketgpt.load(hf_folder(root / f"hf-{i}", kind, tk, bos, seed=i, **config))
        ids = lm.tokenizer.encode_prompt(text)[:tokens]
        past = ORIGINAL_CONTEXT if "rope_parameters" in config else 0
        out.append(Case(label, lm.model, lm.tokenizer, ids, text, past=past))
        if past:  # how much of the difference is llama.cpp's f16 KV cache
            out.append(Case(label + ", KV cache f32", lm.model, lm.tokenizer, ids, text, kv_f32=True, past=past))
    return out


CHAT_MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who says this?"},
                 {"role": "assistant", "content": "ROMEO"}, {"role": "user", "content": "And this, café 🚀?"}]


def chat_cases(root: Path, data: Path, corpus: str, tokens: int) -> list[Case]:
    """A trained run given pocketgpt's turn tokens (as a fine-tune on conversations does; their rows the mean):
    a conversation's ids, its rendered text and the template itself, through llama.cpp."""
    import pocketgpt
    from pocketgpt.chat import WithChatTokens, chat_prompt

    lm = pocketgpt.load(train_tiny(root, data, "tiny-chat", mlp="gelu_new"))
    tok = WithChatTokens(lm.tokenizer)
    model = lm.model.with_vocab(tok.vocab_size)
    turns = tok.decode(chat_prompt(tok, CHAT_MESSAGES).prompt)
    text = (turns + corpus[-3000:]) * 2
    return [Case("gpt2 + pocketgpt's turn tokens and template: tiny trained, bpe 512", model, tok,
                 tok.encode(text)[:min(tokens, lm.block_size)], turns + corpus[-2000:] + turns)]


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--tokens", type=int, default=128, help="length of each id sequence (at most a model's context)")
    ap.add_argument("--only", help="comma-separated groups of rows: gpt2, runs, folders, chat (default: all)")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("this benchmark needs llama-cpp-python: pip install llama-cpp-python") from None
    print(f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, {args.tokens} ids per sequence")
    results = []
    with common.scratch() as root:
        corpus = common.bundled_text()
        text = corpus[-4000:] + TOKENIZER_TEXT + "\n" + MIXED
        data = None
        groups_known = {"gpt2", "runs", "folders", "chat"}
        only = set(args.only.split(",")) if args.only else groups_known
        if only - groups_known:
            raise SystemExit(f"--only: unknown group(s) {sorted(only - groups_known)}")
        if only & {"gpt2", "runs", "chat"}:
            data = common.prepare_bundled(root / "data", "--tokenizer", "bpe", "--vocab-size", "512")
        groups = {"gpt2": lambda: gpt2_cases(root, data, corpus, text, args.tokens),
                  "runs": lambda: family_run_cases(root, data, corpus, text, args.tokens),
                  "folders": lambda: hf_folder_cases(root, corpus, args.tokens),
                  "chat": lambda: chat_cases(root, data, corpus, args.tokens)}
        for name, make in groups.items():
            if name in only:
                for case in make():  # each group's models made, compared and let go before the next's
                    results.append((case, compare(case, root / "m.gguf")))
                    print(f"  done: {case.label}", file=sys.stderr, flush=True)
    common.markdown_header("model", "llama.cpp arch (pre)", "GGUF", "file", "max abs logit diff", "max abs logit",
                           "top-1 agreement", "tokenizer ids agree", f"greedy {GREEDY_NEW} ids equal")
    for case, r in results:
        print(f"| {case.label} | {r['arch']} ({r['pre']}) | {case.dtype} | {r['bytes'] / 1e6:.1f} MB | "
              f"{r['diff']:.2e} | {r['scale']:.1f} | {r['top1']:.1%} | "
              f"{'yes' if r['tokens_agree'] else 'no'} ({r['n_tokens']}) | "
              f"{'yes' if r['greedy_equal'] else 'no'} |")
    for case, r in results:
        if "template_equal" in r:
            print(f"\n{case.label}: the GGUF's chat template rendered by llama-cpp-python equals pocketgpt's prompt: "
                  f"{'yes' if r['template_equal'] else 'no'}")
        if "past" in r:
            print(f"\n{case.label}: past position {case.past}, llama.cpp differs from pocketgpt by at most "
                  f"{r['past'][0]:.2e}; pocketgpt's logits without the scaling differ by up to {r['past'][1]:.2f}")
        for note in r["notes"]:
            print(f"\n{case.label}: {note}")


if __name__ == "__main__":
    main()
