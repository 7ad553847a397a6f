"""The contenders and workloads. Every contender gets the same settings where libraries differ by default:
dropout 0.1 on residuals, inside the feed-forward AND on attention weights (nn.Transformer cannot separate
them), ReLU, post-norm,
embeddings scaled by sqrt(d_model) and tied across encoder input, decoder input and output, sinusoidal
positions, label smoothing 0.1, AdamW (torch's fused implementation, the fastest on CPU, for every contender)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from transformer import ModelConfig, Transformer, TransformerLM
from transformer.data import BOS, EOS, PAD
from transformer.generate import beam_search, greedy


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


def have_hf() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# Models


def ours(size: Size, dropout: float = 0.1) -> Transformer:
    return Transformer(ModelConfig(
        src_vocab_size=size.vocab, tgt_vocab_size=size.vocab, d_model=size.d_model, n_heads=size.heads,
        n_encoder_layers=size.layers, n_decoder_layers=size.layers, d_ff=size.d_ff, dropout=dropout,
        attention_dropout=dropout, tie_embeddings="all"))


class TorchTransformerModel(nn.Module):
    """torch.nn.Transformer with what a user adds around it: tied scaled embeddings, sinusoidal positions,
    an output layer, causal + padding masks."""

    def __init__(self, size: Size, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(size.vocab, size.d_model, padding_idx=PAD)
        self.core = nn.Transformer(size.d_model, size.heads, size.layers, size.layers, size.d_ff, dropout,
                                   batch_first=True)
        self.out = nn.Linear(size.d_model, size.vocab, bias=False)
        self.out.weight = self.embed.weight
        pos = torch.arange(1024)[:, None] * torch.exp(torch.arange(0, size.d_model, 2) * (-math.log(1e4) / size.d_model))
        pe = torch.zeros(1024, size.d_model)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos), torch.cos(pos)
        self.register_buffer("pe", pe)
        self.scale = math.sqrt(size.d_model)

    def _in(self, ids):
        return self.embed(ids) * self.scale + self.pe[: ids.size(1)]

    def loss(self, src, tgt_in, tgt_out, label_smoothing):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.size(1), dtype=torch.bool)
        h = self.core(self._in(src), self._in(tgt_in), tgt_mask=causal, src_key_padding_mask=src == PAD,
                      memory_key_padding_mask=src == PAD, tgt_is_causal=True)
        logits = self.out(h)
        return F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=PAD,
                               label_smoothing=label_smoothing)


def marian(size: Size, dropout: float = 0.1):
    from transformers import MarianConfig, MarianMTModel

    cfg = MarianConfig(
        vocab_size=size.vocab, d_model=size.d_model, encoder_layers=size.layers, decoder_layers=size.layers,
        encoder_attention_heads=size.heads, decoder_attention_heads=size.heads, encoder_ffn_dim=size.d_ff,
        decoder_ffn_dim=size.d_ff, dropout=dropout, attention_dropout=dropout, activation_dropout=dropout,
        activation_function="relu", scale_embedding=True, pad_token_id=PAD, eos_token_id=EOS,
        decoder_start_token_id=BOS, forced_eos_token_id=None, bos_token_id=BOS, max_position_embeddings=1024,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True)
    model = MarianMTModel(cfg)
    return model


def marian_loss(model, src, tgt_in, tgt_out, label_smoothing):
    out = model(input_ids=src, attention_mask=src != PAD, decoder_input_ids=tgt_in, use_cache=False)
    return F.cross_entropy(out.logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=PAD,
                           label_smoothing=label_smoothing)


# ----------------------------------------------------------------------------------------------------------
# Workloads: each returns {contender: zero-argument callable}


def _batch(size: Size, batch: int = 32, length: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, size.vocab, (batch, length), generator=g)
    tgt = torch.randint(4, size.vocab, (batch, length), generator=g)
    tgt_in = torch.cat([torch.full((batch, 1), BOS), tgt[:, :-1]], 1)
    return src, tgt_in, tgt


def _train_step(model, loss_fn, bf16: bool) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), fused=True)
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_contenders(size: Size, bf16: bool, with_hf: bool, batch: int = 32, length: int = 32,
                     with_ours_fp32: bool = False) -> dict:
    """Training steps of each contender; `with_ours_fp32` adds our own fp32 step to a bf16 comparison."""
    torch.manual_seed(0)
    src, tgt_in, tgt_out = _batch(size, batch, length)
    m = ours(size)
    t = TorchTransformerModel(size)
    out = {
        "ours": _train_step(m, lambda: m.loss(src, tgt_in, tgt_out, 0.1), bf16),
        "nn.Transformer": _train_step(t, lambda: t.loss(src, tgt_in, tgt_out, 0.1), bf16),
    }
    if with_ours_fp32:
        m32 = ours(size)
        out["ours fp32"] = _train_step(m32, lambda: m32.loss(src, tgt_in, tgt_out, 0.1), False)
    if with_hf:
        h = marian(size)
        out["HF Marian"] = _train_step(h, lambda: marian_loss(h, src, tgt_in, tgt_out, 0.1), bf16)
    return out


def _no_eos(model: Transformer) -> Transformer:
    # random weights: make </s> never the argmax, so every contender decodes exactly the same number of tokens
    with torch.no_grad():
        model.output.weight[EOS].zero_()
        model.output.weight[EOS, 0] = -1e4
    return model.eval()


def _under_autocast(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn()

    return run


def decode_contenders(size: Size, new_tokens: int, batch: int, beam: int, with_hf: bool, naive: bool,
                      bf16: bool = False) -> dict:
    """Decoding of each contender; `bf16` runs every one under bf16 autocast (our `translate --bf16`)."""
    torch.manual_seed(0)
    src, _, _ = _batch(size, batch, 24)
    m = _no_eos(ours(size))
    out: dict[str, Callable] = {}
    if beam == 1:
        out["ours"] = lambda: greedy(m, src, max_len_a=0, max_len_b=new_tokens)
        if naive:
            out["naive recompute"] = lambda: greedy(m, src, max_len_a=0, max_len_b=new_tokens, use_cache=False)
    else:
        out["ours"] = lambda: beam_search(m, src, beam, max_len_a=0, max_len_b=new_tokens)
    if with_hf:
        h = marian(size).eval()

        def hf():
            with torch.no_grad():
                h.generate(input_ids=src, attention_mask=src != PAD, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, num_beams=beam, do_sample=False, early_stopping=False)

        out["HF generate"] = hf
    return {name: _under_autocast(fn) for name, fn in out.items()} if bf16 else out


def lm_contenders(with_hf: bool, vocab: int = 69, layers: int = 4, heads: int = 4, d: int = 128, block: int = 64,
                  batch: int = 12) -> dict:
    torch.manual_seed(0)
    x = torch.randint(4, vocab, (batch, block))
    y = torch.randint(4, vocab, (batch, block))
    m = TransformerLM(ModelConfig(tgt_vocab_size=vocab, d_model=d, n_heads=heads, n_decoder_layers=layers,
                                  d_ff=4 * d, dropout=0.0, activation="gelu", norm_first=True,
                                  positional="learned", max_positions=block, tie_embeddings="decoder",
                                  arch="decoder-only"))
    out = {"ours": _train_step(m, lambda: m.loss(x, y), False)}
    if with_hf:
        from transformers import GPT2Config, GPT2LMHeadModel

        h = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=block, n_embd=d, n_layer=layers, n_head=heads,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

        def hf_loss():
            logits = h(input_ids=x).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

        out["HF GPT-2"] = _train_step(h, hf_loss, False)
    return out


def matmul_peak(bf16: bool, n: int = 1024, repeat: int = 10) -> float:
    """FLOP/s of a square matrix product: the measured peak that utilisation is reported against. The best of
    torch's default product and oneDNN's (which our fp32 `Linear` uses), so the peak is never the slower one."""
    import time

    from transformer import backend, linear

    dt = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    products = [lambda: a @ b]
    if backend._works(dt):
        products.append(lambda: linear._onednn(a, b, None))
    best = 0.0
    for product in products:
        for _ in range(3):
            product()
        t = time.perf_counter()
        for _ in range(repeat):
            product()
        best = max(best, 2 * n**3 * repeat / (time.perf_counter() - t))
    return best


def step_flops(size: Size, bf16: bool, batch: int = 32, length: int = 32) -> int:
    """Matrix-product FLOPs of one forward + backward of our model (counted by torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    from transformer import backend

    m = ours(size)
    src, tgt_in, tgt_out = _batch(size, batch, length)
    counter = FlopCounterMode(display=False)
    fast = backend.cpu_paths()
    backend.set_cpu_paths(backend.CpuPaths(why="counting"))  # the counter knows aten's products only: same math
    try:
        with counter, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            m.loss(src, tgt_in, tgt_out, 0.1).backward()
    finally:
        backend.set_cpu_paths(fast)
    return counter.get_total_flops()


def peak_memory(step: Callable[[], None]) -> int:
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
