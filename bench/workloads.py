"""The contenders and workloads. Every contender gets the same settings where libraries differ by default:
ReLU, post-norm, embeddings scaled by sqrt(d_model) (with dropout after adding the positions) and tied across
encoder input, decoder input and output, sinusoidal positions, label smoothing 0.1, AdamW (torch's fused
implementation, the fastest on CPU, for every contender). Dropout comes in two settings:

- "all 0.1": 0.1 on residuals, inside the feed-forward and on attention weights (nn.Transformer cannot
  separate them). Attention dropout sends the peers to PyTorch's unfused attention on the CPU.
- "Marian defaults": 0.1 on residuals only, none on attention weights or inside the feed-forward (ours and
  Marian; nn.Transformer cannot express it).

nn.Transformer always ends each stack with a LayerNorm (two more than ours and Marian's post-norm stacks).

Every contender returns the work it did (target tokens of a training step, tokens written by decoding), so
the harness can check that all did the same. Decoding uses random weights with `</s>` suppressed the same way
for every contender (its logit set to -1e9 by a hook on the output layer), so each writes exactly the same
number of tokens.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from transformer import ModelConfig, Transformer, TransformerLM, backend, cpu
from transformer.cpu.linear import packed_weights
from transformer.generate import beam_search, greedy
from transformer.tokenizers import BOS, EOS, PAD


@dataclass
class Size:
    name: str
    d_model: int
    heads: int
    layers: int
    d_ff: int
    vocab: int = 8000


SMALL = Size("small", 256, 4, 3, 1024)
BASE = Size("base", 512, 8, 6, 2048)
TINY = Size("tiny", 32, 2, 1, 64, vocab=200)  # the smoke run

ALL = "all 0.1"
MARIAN = "Marian defaults"


def have_hf() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _dropouts(setting: str) -> tuple[float, float, float]:
    """(residual, attention, inside the feed-forward) dropout of a setting."""
    return (0.1, 0.1, 0.1) if setting == ALL else (0.1, 0.0, 0.0)


# ----------------------------------------------------------------------------------------------------------
# Models


def ours(size: Size, dropouts: str = ALL) -> Transformer:
    residual, attention, ffn = _dropouts(dropouts)
    return Transformer(
        ModelConfig(
            src_vocab_size=size.vocab,
            tgt_vocab_size=size.vocab,
            d_model=size.d_model,
            n_heads=size.heads,
            n_encoder_layers=size.layers,
            n_decoder_layers=size.layers,
            d_ff=size.d_ff,
            dropout=residual,
            attention_dropout=attention,
            activation_dropout=ffn,
            tie_embeddings="all",
        )
    )


class TorchTransformerModel(nn.Module):
    """torch.nn.Transformer with what a user adds around it: tied scaled embeddings, sinusoidal positions,
    dropout after them, an output layer, causal + padding masks."""

    def __init__(self, size: Size, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(size.vocab, size.d_model, padding_idx=PAD)
        self.core = nn.Transformer(
            size.d_model, size.heads, size.layers, size.layers, size.d_ff, dropout, batch_first=True
        )
        self.out = nn.Linear(size.d_model, size.vocab, bias=False)
        self.out.weight = self.embed.weight
        self.drop = nn.Dropout(dropout)
        pos = torch.arange(1024)[:, None] * torch.exp(
            torch.arange(0, size.d_model, 2) * (-math.log(1e4) / size.d_model)
        )
        pe = torch.zeros(1024, size.d_model)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos), torch.cos(pos)
        self.register_buffer("pe", pe)
        self.scale = math.sqrt(size.d_model)

    def _in(self, ids):
        return self.drop(self.embed(ids) * self.scale + self.pe[: ids.size(1)])

    def loss(self, src, tgt_in, tgt_out, label_smoothing):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.size(1), dtype=torch.bool)
        h = self.core(
            self._in(src),
            self._in(tgt_in),
            tgt_mask=causal,
            src_key_padding_mask=src == PAD,
            memory_key_padding_mask=src == PAD,
            tgt_is_causal=True,
        )
        logits = self.out(h)
        return F.cross_entropy(
            logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=PAD, label_smoothing=label_smoothing
        )


def marian(size: Size, dropouts: str = ALL):
    from transformers import MarianConfig, MarianMTModel

    residual, attention, ffn = _dropouts(dropouts)
    cfg = MarianConfig(
        vocab_size=size.vocab,
        d_model=size.d_model,
        encoder_layers=size.layers,
        decoder_layers=size.layers,
        encoder_attention_heads=size.heads,
        decoder_attention_heads=size.heads,
        encoder_ffn_dim=size.d_ff,
        decoder_ffn_dim=size.d_ff,
        dropout=residual,
        attention_dropout=attention,
        activation_dropout=ffn,
        activation_function="relu",
        scale_embedding=True,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=BOS,
        forced_eos_token_id=None,
        bos_token_id=BOS,
        max_position_embeddings=1024,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
    )
    return MarianMTModel(cfg)


def marian_loss(model, src, tgt_in, tgt_out, label_smoothing):
    out = model(input_ids=src, attention_mask=src != PAD, decoder_input_ids=tgt_in, use_cache=False)
    return F.cross_entropy(
        out.logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=PAD, label_smoothing=label_smoothing
    )


# ----------------------------------------------------------------------------------------------------------
# Workloads: each returns {contender: zero-argument callable returning the work done}


def _batch(size: Size, batch: int = 32, length: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, size.vocab, (batch, length), generator=g)
    tgt = torch.randint(4, size.vocab, (batch, length), generator=g)
    tgt_in = torch.cat([torch.full((batch, 1), BOS), tgt[:, :-1]], 1)
    return src, tgt_in, tgt


def _train_step(model, loss_fn, bf16: bool, tokens: int) -> Callable[[], int]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), fused=True)
    model.train()

    def step() -> int:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return tokens

    return step


def train_contenders(
    size: Size,
    bf16: bool,
    with_hf: bool,
    batch: int = 32,
    length: int = 32,
    with_ours_fp32: bool = False,
    dropouts: str = ALL,
) -> dict:
    """Training steps of each contender; `with_ours_fp32` adds our own fp32 step to a bf16 comparison."""
    torch.manual_seed(0)
    src, tgt_in, tgt_out = _batch(size, batch, length)
    n = tgt_out.numel()
    m = ours(size, dropouts)
    out = {"ours": _train_step(m, lambda: m.loss(src, tgt_in, tgt_out, 0.1), bf16, n)}
    if dropouts == ALL:
        t = TorchTransformerModel(size)
        out["nn.Transformer"] = _train_step(t, lambda: t.loss(src, tgt_in, tgt_out, 0.1), bf16, n)
    if with_ours_fp32:
        m32 = ours(size, dropouts)
        out["ours fp32"] = _train_step(m32, lambda: m32.loss(src, tgt_in, tgt_out, 0.1), False, n)
    if with_hf:
        h = marian(size, dropouts)
        out["HF Marian"] = _train_step(h, lambda: marian_loss(h, src, tgt_in, tgt_out, 0.1), bf16, n)
    return out


def suppress_eos(output_layer: nn.Module) -> None:
    """Make `</s>` (practically) impossible for a model with random weights: its logit becomes -1e9 (finite,
    so that a beam search can still be made to end on it)."""

    def hook(module, inputs, logits):
        logits[..., EOS] = -1e9
        return logits

    output_layer.register_forward_hook(hook)


def _under_autocast(fn: Callable[[], int]) -> Callable[[], int]:
    def run() -> int:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn()

    return run


def decode_contenders(
    size: Size, new_tokens: int, batch: int, beam: int, with_hf: bool, naive: bool, bf16: bool = False
) -> dict:
    """Decoding of each contender; `bf16` runs every one under bf16 autocast (our `translate --bf16`). Each
    returns the number of tokens it wrote (without <s>/</s>)."""
    torch.manual_seed(0)
    src, _, _ = _batch(size, batch, 24)
    m = ours(size).eval()
    suppress_eos(m.output)
    # ours prepares its decoding weights once (packed, transposed), as `translate` and the server do for all
    # their batches: every round decodes with them
    m._prepared_for_bench = prepared = contextlib.ExitStack()  # lives as long as the model
    prepared.enter_context(packed_weights(m.decoder, m.output))
    out: dict[str, Callable[[], int]] = {}
    if beam == 1:
        out["ours"] = lambda: sum(map(len, greedy(m, src, max_len_a=0, max_len_b=new_tokens)))
        if naive:
            out["naive recompute"] = lambda: sum(
                map(len, greedy(m, src, max_len_a=0, max_len_b=new_tokens, use_cache=False))
            )
    else:
        out["ours"] = lambda: sum(map(len, beam_search(m, src, beam, max_len_a=0, max_len_b=new_tokens)))
    if with_hf:
        h = marian(size).eval()
        suppress_eos(h.lm_head)

        def hf() -> int:
            with torch.no_grad():
                seqs = h.generate(
                    input_ids=src,
                    attention_mask=src != PAD,
                    max_new_tokens=new_tokens,
                    num_beams=beam,
                    do_sample=False,
                    early_stopping=False,
                )
            written = seqs[:, 1:]  # after the decoder start token
            return int((written != PAD).sum() - (written == EOS).sum())

        out["HF generate"] = hf
    return {name: _under_autocast(fn) for name, fn in out.items()} if bf16 else out


def lm_contenders(
    with_hf: bool, vocab: int = 69, layers: int = 4, heads: int = 4, d: int = 128, block: int = 64, batch: int = 12
) -> dict:
    """A language-model training step (the shakespeare-char shape): ours against GPT-2 with the same erf GELU
    ("HF GPT-2"), and GPT-2 at its own default activation, gelu_new, a tanh formula ("HF GPT-2 gelu_new")."""
    torch.manual_seed(0)
    x = torch.randint(4, vocab, (batch, block))
    y = torch.randint(4, vocab, (batch, block))
    m = TransformerLM(
        ModelConfig(
            tgt_vocab_size=vocab,
            d_model=d,
            n_heads=heads,
            n_decoder_layers=layers,
            d_ff=4 * d,
            dropout=0.0,
            activation="gelu",
            norm_first=True,
            positional="learned",
            max_positions=block,
            tie_embeddings="decoder",
            arch="decoder-only",
        )
    )
    out = {"ours": _train_step(m, lambda: m.loss(x, y), False, y.numel())}
    if with_hf:
        from transformers import GPT2Config, GPT2LMHeadModel

        for name, activation in (("HF GPT-2", "gelu"), ("HF GPT-2 gelu_new", "gelu_new")):
            h = GPT2LMHeadModel(
                GPT2Config(
                    vocab_size=vocab,
                    n_positions=block,
                    n_embd=d,
                    n_layer=layers,
                    n_head=heads,
                    resid_pdrop=0.0,
                    embd_pdrop=0.0,
                    attn_pdrop=0.0,
                    activation_function=activation,
                )
            )

            def hf_loss(h=h):
                logits = h(input_ids=x).logits
                return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

            out[name] = _train_step(h, hf_loss, False, y.numel())
    return out


# ----------------------------------------------------------------------------------------------------------
# Utilisation and memory


def step_product_shapes(size: Size, tokens: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of the forward matrix products of one training step of our model on `tokens` tokens per side:
    the shapes a utilisation peak should be measured at."""
    d, f, v = size.d_model, size.d_ff, size.vocab
    per_layer = [(tokens, d, 3 * d), (tokens, d, d), (tokens, d, f), (tokens, f, d)]  # qkv, out, feed-forward
    cross = [(tokens, d, d), (tokens, d, 2 * d), (tokens, d, d)]  # q, kv, out
    return per_layer * size.layers + (per_layer + cross) * size.layers + [(tokens, d, v)]


def product_peak(shapes: list[tuple[int, int, int]], bf16: bool) -> Callable[[], float]:
    """A contender that runs every distinct product shape of `shapes` once with torch's default product and
    once with oneDNN's (where it works here), and returns the best FLOP/s over the set: the achievable rate at
    the step's own shapes, each shape with its faster library."""
    _onednn = cpu.paths.onednn_linear

    dt = torch.bfloat16 if bf16 else torch.float32
    g = torch.Generator().manual_seed(0)
    distinct = sorted(set(shapes))
    mats = {
        s: (torch.randn(s[0], s[1], generator=g).to(dt), torch.randn(s[2], s[1], generator=g).to(dt)) for s in distinct
    }
    libraries = [F.linear] + ([lambda a, w: _onednn(a, w, None)] if cpu.paths.works(dt) else [])
    count = {s: shapes.count(s) for s in distinct}

    def run() -> float:
        seconds = 0.0
        for s in distinct:
            a, w = mats[s]
            best = math.inf
            for product in libraries:
                product(a, w)
                t = time.perf_counter()
                product(a, w)
                best = min(best, time.perf_counter() - t)
            seconds += best * count[s]
        return sum(2 * m * k * n for m, k, n in shapes) / seconds

    return run


def nominal_peak(bf16: bool) -> tuple[Optional[float], str]:
    """The hardware's nominal peak FLOP/s for our threads, cores x clock x FLOPs per cycle, and how it was
    reckoned; None where it cannot be reckoned from what the CPU reports."""
    flags = backend.cpu_flags()
    clock = _max_clock_hz()
    if clock is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return None, "clock or vector width unknown"
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4  # fp32 lanes per vector
    per_cycle, kind = lanes * 2 * 2, "fp32: lanes x 2 FLOPs per FMA x 2 FMA units, assumed"
    if bf16:
        if "amx_bf16" in flags:
            return None, "AMX's bf16 rate is not a multiple of the vector units'"
        if "avx512_bf16" not in flags:
            return None, "no native bf16"
        per_cycle, kind = per_cycle * 2, "AVX512-BF16: twice fp32's, 2 FMA units assumed"
    cores = torch.get_num_threads()
    return cores * clock * per_cycle, f"{cores} cores x {clock / 1e9:.2f} GHz x {per_cycle} FLOP/cycle ({kind})"


def _max_clock_hz() -> Optional[float]:
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) * 1e3
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) * 1e6
    except (OSError, ValueError):
        pass
    return None


def step_flops(size: Size, bf16: bool, batch: int = 32, length: int = 32) -> int:
    """Matrix-product FLOPs of one forward + backward of our model (counted by torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = ours(size)
    src, tgt_in, tgt_out = _batch(size, batch, length)
    counter = FlopCounterMode(display=False)
    fast = cpu.cpu_paths()
    cpu.set_cpu_paths(cpu.CpuPaths(why="counting"))  # the counter knows aten's products only: same math
    try:
        with counter, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            m.loss(src, tgt_in, tgt_out, 0.1).backward()
    finally:
        cpu.set_cpu_paths(fast)
    return counter.get_total_flops()


def peak_memory(step: Callable[[], object]) -> int:
    """Peak bytes allocated by the CPU allocator during one call, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # each op's own allocations minus frees, in time order (inclusive figures would count children twice)
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def threads(n: Optional[int]):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------------------------------------
# The race with CTranslate2: the same weights, exported to it


def have_ct2() -> bool:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return False
    return True


class _NamedVocabulary:
    """Token strings for a random model's ids (what CTranslate2 reads and writes)."""

    def __init__(self, size: int) -> None:
        self.vocab_size = size
        self.names = ["<pad>", "<s>", "</s>", "<unk>"] + [f"t{i}" for i in range(4, size)]

    def token_text(self, i: int) -> str:
        return self.names[i]


def ct2_env() -> dict[str, str]:
    """The CT2_* settings CTranslate2's worker runs with: the caller's own, and CT2_USE_MKL always, pinned to
    what CTranslate2 would pick itself on this CPU (MKL on GenuineIntel only) unless set, so that the record
    names the backend. The choice moves the fp32 products between Intel MKL (packed GEMM on by default) and
    oneDNN (unpacked), and with it CTranslate2's figures from one kind of CPU to another."""
    env = {k: v for k, v in os.environ.items() if k.startswith("CT2_")}
    env.setdefault("CT2_USE_MKL", "1" if cpu_vendor() == "GenuineIntel" else "0")
    return env


def cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def ours_info() -> dict:
    """What our side of a race runs with: threads, PyTorch's kernel ISA, the oneDNN paths, the int8 products,
    the OpenMP runtime and the threading/spin-wait settings."""
    from transformer.cpu import int8

    from .ct2_worker import openmp_runtime, settings

    return {
        "threads": torch.get_num_threads(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "cpu_paths": cpu.cpu_paths().describe(),
        "int8": "kernel" + (" (VNNI and AMX)" if int8.uses_amx() else " (VNNI)") if int8.available() else "fbgemm",
        "openmp": openmp_runtime(),
        "env": settings(),
    }


def ct2_contenders(size: Size, new_tokens: int, batch: int, beam: int, int8: bool, directory: Path):
    """Decoding of `batch` sentences x `new_tokens` tokens by ours and by CTranslate2 on the same weights,
    float32 or int8 (ours: int8 weights with dynamic quantisation; CTranslate2: its int8 compute type), with
    CTranslate2's intra_threads = our thread count, in a process of its own (see ct2_worker) with `ct2_env()`.
    </s> is impossible for both (ours: its logit -1e9; CTranslate2: min_decoding_length), so both write exactly
    new_tokens per sentence. Returns (contenders, the worker): the caller closes the worker, and its pid is
    the race's second process (the harness waits for both to be idle between calls)."""
    from transformer.checkpoint import Checkpoint
    from transformer.cpu.linear import int8_weights
    from transformer.interop.ctranslate2 import export_ct2

    from . import ct2_worker

    torch.manual_seed(0)
    src, _, _ = _batch(size, batch, 24)
    m = ours(size).eval()
    vocab = _NamedVocabulary(size.vocab)
    export_ct2(
        Checkpoint(m, m.config, "translation", {"src": vocab, "tgt": vocab}),
        directory,
        quantization="int8" if int8 else None,
    )
    mallopt = cpu.memory.ALLOCATOR_SETTINGS if cpu.memory.tune_allocator() else ()  # its allocator set as ours
    # compute types named, not "default": on an int8 model "default" would keep int8 for the fp32 row
    translator = ct2_worker.Translator(
        str(directory), "int8" if int8 else "float32", torch.get_num_threads(), mallopt, ct2_env()
    )
    suppress_eos(m.output)
    tokens = [[vocab.token_text(i) for i in row.tolist()] for row in src]

    # Like CTranslate2's model, which is converted once when loaded, ours prepares its weights for decoding once
    # (packed, transposed, or quantised to int8), as `translate` and the server do for all their batches.
    prepared = contextlib.ExitStack()  # held by run_ours: closing it (or collecting it) drops what was prepared
    prepared.enter_context(int8_weights(m) if int8 else packed_weights(m.decoder, m.output))

    def run_ours(prepared=prepared) -> int:
        out = (
            greedy(m, src, max_len_a=0, max_len_b=new_tokens)
            if beam == 1
            else beam_search(m, src, beam, max_len_a=0, max_len_b=new_tokens)
        )
        return sum(map(len, out))

    def run_ct2() -> int:
        return translator.translate(
            tokens, beam_size=beam, max_decoding_length=new_tokens, min_decoding_length=new_tokens
        )

    return {"ours": run_ours, "CTranslate2": run_ct2}, translator


def int8_product_shapes(size: Size, rows: int) -> list[tuple[int, int, int]]:
    """(rows, in, out) of each distinct product of a decoding step of `size` (vocabulary included)."""
    E, F_ = size.d_model, size.d_ff
    return [(rows, E, 3 * E), (rows, E, E), (rows, E, F_), (rows, F_, E), (rows, E, size.vocab)]


def int8_product_contenders(rows: int, k: int, n: int, bytes_cycled: float = 64e6) -> dict:
    """One int8 product of `rows` rows by a (n, k) weight: ours (the int8 kernel, cpu/int8.py) against PyTorch's
    int8 linear (fbgemm) on the same weights. Each call takes the next of enough distinct weights to fill
    `bytes_cycled` in int8, as a decoding step meets each weight once, after all the others: what a product
    costs when its weight is not already in the core's own caches."""
    import warnings

    from transformer.cpu import int8

    g = torch.Generator().manual_seed(0)
    count = max(4, int(bytes_cycled // (n * k)))
    weights = [torch.randn(n, k, generator=g) * 0.05 for _ in range(count)]
    x = torch.randn(rows, k, generator=g)
    ours_w = [int8.pack(w) for w in weights]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fbgemm_w = [int8.pack_fbgemm(w, None) for w in weights]
    del weights
    calls = 4 * count

    def cycle(fn, packed):
        def run() -> int:
            for i in range(calls):
                fn(x, packed[i % count])
            return calls

        return run

    return {"ours": cycle(int8.linear, ours_w), "fbgemm": cycle(torch.ops.quantized.linear_dynamic, fbgemm_w)}
