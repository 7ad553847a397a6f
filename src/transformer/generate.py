"""Decoding: greedy and beam search for the encoder-decoder, sampling for the language model.

All of them run one incremental loop over the decoder's KV cache: each step feeds only the newest token,
self-attention keys/values grow in the cache, and the source's cross-attention keys/values are computed once.
Sentences that finish leave the active batch, so the work per step shrinks as decoding goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .batching import pad_batch
from .cpu.linear import packed_weights
from .cpu.lm_step import lm_step_decoder
from .cpu.step import step_decoder
from .errors import TransformerError
from .model import Transformer, TransformerLM
from .tokenizers import PAD, Tokenizer

log = logging.getLogger("transformer")


@dataclass(frozen=True)
class DecodingSettings:
    """How to decode a translation: the settings the command line, the server and `translate_texts` share.

    beam_size: 1 is greedy. length_penalty: beam hypotheses are ranked by log-probability / length**penalty.
    max_len_a, max_len_b: at most a * source tokens + b output tokens (before </s>); max_len: and at most this
    many, whatever the source's length (0: no such cap; a server's --max-new-tokens)."""

    beam_size: int = 1
    length_penalty: float = 1.0
    max_len_a: float = 1.5
    max_len_b: int = 10
    max_len: int = 0

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise TransformerError(f"beam size must be >= 1, got {self.beam_size}")
        _check_lengths(self.max_len_a, self.max_len_b)


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample a language model's continuation (`sample`): the command line's and the server's."""

    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # the k most probable tokens only (0: all)
    top_p: float = 1.0  # the smallest set of tokens with probability >= p
    seed: int = 0

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.max_new_tokens)


def max_lengths(src: Tensor, max_len_a: float, max_len_b: int, pad_id: int = PAD, cap: int = 0) -> Tensor:
    """(B, S) padded source ids -> (B,) limits on output tokens (before </s>): a * source length + b, at most
    `cap` if it is not 0."""
    n = (src != pad_id).sum(1)
    limits = (n.double() * max_len_a).long() + max_len_b  # float64: the same rounding as Python
    return limits.clamp(max=cap) if cap else limits


class DecodingCancelled(Exception):
    """Raised between decoding steps when the caller's `should_stop()` says so (a server's abandoned request)."""


def _check_stop(should_stop: Optional[Callable[[], bool]]) -> None:
    if should_stop is not None and should_stop():
        raise DecodingCancelled("decoding stopped: nobody waits for its result")


def _check_lengths(max_len_a: float, max_len_b: int) -> None:
    if max_len_a < 0 or max_len_b < 0:
        raise TransformerError(f"maximum length must not be negative (max_len_a={max_len_a}, max_len_b={max_len_b})")


@torch.no_grad()
def greedy(
    model: Transformer,
    src: Tensor,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    use_cache: bool = True,
    max_len: int = 0,
    should_stop: Optional[Callable[[], bool]] = None,
) -> list[list[int]]:
    """The most probable next token at each step.

    Args:
        model: an encoder-decoder in eval mode.
        src: (B, S) source ids, right-padded with the model's pad_id.
        max_len_a, max_len_b: a sentence of n source tokens gets at most a * n + b output tokens.
        use_cache: False recomputes the whole decoder every step (for comparison only).
        max_len: at most this many output tokens (0: no cap).
        should_stop: called before each step; True raises DecodingCancelled.
    Returns:
        B lists of token ids, without <s> and </s>.
    """
    _check_lengths(max_len_a, max_len_b)
    bos, eos = model.config.bos_id, model.config.eos_id
    B = src.size(0)
    limits = max_lengths(src, max_len_a, max_len_b, model.config.pad_id, max_len)
    steps = _SourceSteps(model, src, 1, int(limits.max()) + 1) if use_cache else _Recompute(model, src)
    with steps.packed():
        limit = limits.tolist()
        active = list(range(B))  # original index of each row still decoding
        last = torch.full((B, 1), bos, dtype=torch.long, device=src.device)
        out: list[list[int]] = [[] for _ in range(B)]
        for step in range(max(limit)):  # step: tokens each active row has written so far
            _check_stop(should_stop)
            nxt = argmax(steps.logits(last))
            keep = []
            for i, (row, tok) in enumerate(zip(active, nxt.tolist())):
                if limit[row] <= step or tok == eos:  # ended (no room at all: ended before writing)
                    continue
                out[row].append(tok)
                if limit[row] > step + 1:  # room for more
                    keep.append(i)
            if not keep:
                break
            last = nxt[:, None]
            if len(keep) < len(active):
                rows = torch.tensor(keep, device=src.device)
                active, last = [active[i] for i in keep], last[rows]
                steps.keep(rows, rows)
        return out


def _blocks(x: Tensor, c: int = 64) -> tuple[int, Tensor]:
    """(n, V) -> (the V - V % c values in whole blocks, those values as (n, V // c, c) blocks)."""
    main = x.size(1) - x.size(1) % c
    return main, x[:, :main].view(x.size(0), main // c, c)


def argmax(x: Tensor) -> Tensor:
    """(n, V) -> (n,) the index of each row's largest value (the first of equal ones), as `x.argmax(-1)`.

    torch's CPU argmax is a scalar loop, a noticeable share of a small model's decoding step at a vocabulary of
    thousands; the maximum of each block of 64 values is a vectorised reduction, after which only the first
    block holding the row's maximum is searched."""
    n, V = x.shape
    if x.device.type != "cpu" or V < 256 or not x.is_contiguous():
        return x.argmax(-1)
    main, blocks = _blocks(x)
    block_max = blocks.amax(-1)  # (n, blocks)
    best = block_max.argmax(-1)  # (n,) the first block holding the maximum
    idx = best * blocks.size(2) + blocks[torch.arange(n, device=x.device), best].argmax(-1)
    if main < V:  # the last V % 64 values
        tail_max, tail_idx = x[:, main:].max(-1)
        idx = torch.where(tail_max > block_max.gather(1, best[:, None]).squeeze(1), main + tail_idx, idx)
    return idx


def topk_beams(x: Tensor, offset: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k best continuations of each sentence over all its beams.

    Args:
        x: (n * K, V) each beam's log-probabilities (rows i * K ... i * K + K - 1: sentence i's K beams).
        offset: (n, K) each beam's score so far, added to its row.
        k: continuations to keep per sentence.
    Returns:
        (n, k) the k largest offset[i, b] + x[i * K + b, v] over b and v, in descending order, and each one's
        beam b and token v: a topk over the K * V sums (equal values may come in another order).

    Like `argmax`, it first takes the maximum of each block of 64 values, adds its beam's score, then searches
    only the k best blocks of the sentence (over all its beams): they hold its k best sums. That is a few small
    operations on n rows, where a topk per beam and another over their K x k winners are many small calls a step."""
    n, K = offset.shape
    V = x.size(1)
    if x.device.type != "cpu" or V // 64 < 4 * k or not x.is_contiguous():
        values, idx = (offset[:, :, None] + x.reshape(n, K, V)).view(n, K * V).topk(k, -1)
        return values, idx // V, idx % V
    main, blocks = _blocks(x)  # (nK, nb, c)
    nb, c = blocks.shape[1:]
    block_max = (blocks.amax(-1).view(n, K, nb) + offset[:, :, None]).view(n, K * nb)
    best = block_max.topk(k, -1).indices  # (n, k) the blocks, over all K beams, with the k best maxima
    beam = best // nb
    found = blocks[torch.arange(n, device=x.device)[:, None] * K + beam, best % nb]  # (n, k, c)
    found = (found + offset.gather(1, beam)[:, :, None]).view(n, k * c)
    if main < V:  # and the last V % c values of each beam
        found = torch.cat([found, (x[:, main:].view(n, K, V - main) + offset[:, :, None]).view(n, -1)], dim=1)
    values, j = found.topk(k, -1)
    block = best.gather(1, (j // c).clamp_(max=k - 1))
    beam, tok = block // nb, block % nb * c + j % c
    if main < V:
        t = (j - k * c).clamp_(min=0)  # a value from the tail: beam t // (V - main), token main + t % (V - main)
        in_tail = j >= k * c
        beam = torch.where(in_tail, t // (V - main), beam)
        tok = torch.where(in_tail, main + t % (V - main), tok)
    return values, beam, tok


class DecodingSteps:
    """What greedy and beam search ask of a model, one step at a time (`_SourceSteps`, `_PromptSteps`,
    `_Recompute`): `logits(last)` takes the (rows, 1) newest tokens and gives (rows, V) next-token logits;
    `keep(rows, sentence_rows)` continues with batch rows `rows` (beams that survive; `sentence_rows`, the rows
    of the sentences still decoding, when some ended); `packed()` is the block inside which the weights stay
    prepared for decoding."""

    model: nn.Module

    def logits(self, last: Tensor) -> Tensor:
        raise NotImplementedError

    def keep(self, rows: Tensor, sentence_rows: Optional[Tensor]) -> None:
        raise NotImplementedError

    def packed(self) -> contextlib.AbstractContextManager:
        return packed_weights(self.model.decoder, self.model.output)


class _Recompute(DecodingSteps):
    """Greedy steps without a cache: the whole decoder runs again over every token so far (for comparison)."""

    def __init__(self, model: Transformer, src: Tensor) -> None:
        self.model = model
        self.memory, self.mask = model.encode(src)
        self.tokens: Optional[Tensor] = None

    def logits(self, last: Tensor) -> Tensor:
        self.tokens = last if self.tokens is None else torch.cat([self.tokens, last], dim=1)
        return self.model.decode(self.tokens, self.memory, self.mask)[:, -1]

    def keep(self, rows: Tensor, sentence_rows: Optional[Tensor]) -> None:
        self.tokens, self.memory, self.mask = self.tokens[rows], self.memory[rows], self.mask[rows]


class _SourceSteps(DecodingSteps):
    """Steps of an encoder-decoder: the source is encoded once (and repeated for each of K beams); each step
    runs the decoder on the newest tokens, by the lean `StepDecoder` where it applies, else by the modules."""

    def __init__(self, model: Transformer, src: Tensor, K: int, capacity: int) -> None:
        self.model, self.K = model, K
        memory, mask = model.encode(src)
        with self.packed():  # a block around this call's decoding, at least: prepared once for it
            self.fast = step_decoder(model)
        if self.fast is not None:
            self.state = self.fast.start(memory, mask, capacity, beams=K)
        else:
            if K > 1:
                memory, mask = memory.repeat_interleave(K, 0), mask.repeat_interleave(K, 0)  # (B*K, S, E)
            self.memory, self.mask, self.cache = memory, mask, model.decoder.new_cache(capacity)

    def logits(self, last: Tensor) -> Tensor:
        """(rows, 1) newest tokens -> (rows, V) next-token logits."""
        if self.fast is not None:
            return self.fast.step(last[:, 0], self.state)
        return self.model.decode(last, self.memory, self.mask, self.cache)[:, -1]

    def keep(self, rows: Tensor, sentence_rows: Optional[Tensor]) -> None:
        """Continue with rows `rows`; `sentence_rows` (the rows of the sentences still decoding, in order) when
        some sentences ended, else None (beams only swapped places within their sentence)."""
        if self.fast is not None:
            self.state.reorder(rows, None if sentence_rows is None else sentence_rows[:: self.K] // self.K)
            return
        self.cache.reorder(rows, cross=sentence_rows is not None)
        if sentence_rows is not None:
            self.memory, self.mask = self.memory[sentence_rows], self.mask[sentence_rows]


class _PromptSteps(DecodingSteps):
    """Beam-search steps of a decoder-only model: the first step reads the whole prompt (repeated per beam)."""

    def __init__(self, model: TransformerLM, prompt: Tensor, K: int, capacity: int) -> None:
        self.model, self.prompt = model, prompt.repeat_interleave(K, 0)  # (B*K, T)
        self.cache = model.decoder.new_cache(capacity)

    def logits(self, last: Tensor) -> Tensor:
        if self.prompt is not None:
            last, self.prompt = self.prompt, None
        return self.model(last, self.cache, last_only=True)[:, -1]

    def keep(self, rows: Tensor, sentence_rows: Optional[Tensor]) -> None:
        self.cache.reorder(rows)


@torch.no_grad()
def beam_search(
    model: Transformer | TransformerLM,
    src: Tensor,
    beam_size: int = 5,
    length_penalty: float = 1.0,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    max_len: int = 0,
    should_stop: Optional[Callable[[], bool]] = None,
) -> list[list[int]]:
    """Batched beam search.

    Args:
        model: an encoder-decoder, or a decoder-only model, in eval mode.
        src: (B, S) source ids, right-padded with the model's pad_id; for a decoder-only model (B, T) prompts
            (of one length), whose continuations are searched.
        beam_size: hypotheses kept per sentence (1 is exactly greedy).
        length_penalty: ended hypotheses are ranked by log-probability / length ** length_penalty.
        max_len_a, max_len_b: a sentence of n source tokens gets at most a * n + b output tokens (a prompt:
            max_len_b new tokens); max_len: at most this many (0: no cap).
        should_stop: called before each step; True raises DecodingCancelled.
    Returns:
        The best hypothesis of each of the B sentences: token ids without <s> and </s> (the prompt excluded).

    Hypotheses are ranked by sum of log-probabilities / length**length_penalty (fairseq's normalisation; the
    length counts </s>). As in fairseq, only an </s> among the top `beam_size` candidates ends a hypothesis,
    and a sentence is finished once it has `beam_size` ended hypotheses, so beam size 1 is exactly greedy.
    """
    if beam_size < 1:
        raise TransformerError(f"beam size must be >= 1, got {beam_size}")
    _check_lengths(max_len_a, max_len_b)
    cfg = model.config
    B, K = src.size(0), beam_size
    if cfg.arch == "decoder-only":
        limits = torch.full((B,), max_len_b, dtype=torch.long, device=src.device)
        steps = _PromptSteps(model, src, K, src.size(1) + max_len_b + 1)
    else:
        limits = max_lengths(src, max_len_a, max_len_b, cfg.pad_id, max_len)
        steps = _SourceSteps(model, src, K, int(limits.max()) + 1)
    with steps.packed():  # the same weights at every step: pack them once
        return _beam(steps, limits, K, cfg.bos_id, cfg.eos_id, length_penalty, should_stop)


def _beam(
    steps, limits: Tensor, K: int, bos: int, eos: int, length_penalty: float, should_stop=None
) -> list[list[int]]:
    """The search itself, over `steps` (a _SourceSteps or _PromptSteps) for sentences of `limits` (B,).
    Bookkeeping that needs no tensor (which sentences are active, their length limits) stays in Python lists,
    so a step runs few tensor operations besides the decoder's."""
    B, dev = limits.numel(), limits.device
    limit = limits.tolist()
    active = list(range(B))  # sentence index of each active block of K rows
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: let only the first one expand
    hyps = torch.full((B * K, 1), bos, dtype=torch.long, device=dev)
    block_start = torch.arange(B, device=dev)[:, None] * K  # the first row of each sentence's block
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    for step in range(max(limit) + 1):
        _check_stop(should_stop)
        n = len(active)
        logp = torch.log_softmax(steps.logits(hyps[:, -1:]).float(), dim=-1)  # (nK, V)
        if min(limit[b] for b in active) <= step:  # some sentences must end now: only </s> may follow
            must_end = torch.tensor([limit[b] <= step for b in active], device=dev).repeat_interleave(K)
            forced = torch.full_like(logp[0], float("-inf"))
            forced[eos] = 0.0
            logp = torch.where(must_end[:, None], logp + forced, logp)
        # the 2K best continuations of each sentence over its K beams (enough to keep K after </s>)
        top_scores, beam_idx, tok = topk_beams(logp, scores, 2 * K)  # (n, 2K) each
        ended = _end_hypotheses(finished, hyps, active, top_scores, beam_idx, tok, K, eos, (step + 1) ** length_penalty)

        # Keep the K best candidates that did not end.
        alive_score, order = top_scores.masked_fill(tok == eos, float("-inf")).topk(K, dim=1)  # (n, K)
        alive_beam, alive_tok = beam_idx.gather(1, order), tok.gather(1, order)
        keep = [i for i, b in enumerate(active) if len(finished[b]) < K] if ended else None
        if keep is not None and not keep:
            break
        if keep is None or len(keep) == n:  # beams only swap places within their sentences
            rows = (block_start[:n] + alive_beam).view(-1)  # which old rows continue
            hyps = torch.cat([hyps[rows], alive_tok.view(-1, 1)], dim=1)
            scores = alive_score
            steps.keep(rows, None)
            continue
        keep_sent = torch.tensor(keep, device=dev)  # (n',)
        rows = (keep_sent[:, None] * K + alive_beam[keep_sent]).view(-1)
        hyps = torch.cat([hyps[rows], alive_tok[keep_sent].view(-1, 1)], dim=1)
        scores = alive_score[keep_sent]
        steps.keep(rows, (keep_sent[:, None] * K + torch.arange(K, device=dev)).view(-1))
        active = [active[i] for i in keep]
    return [max(f, key=lambda h: h[0])[1] if f else [] for f in finished]


def _end_hypotheses(
    finished: list,
    hyps: Tensor,
    active: list[int],
    top_scores: Tensor,
    beam_idx: Tensor,
    tok: Tensor,
    K: int,
    eos: int,
    norm: float,
) -> bool:
    """End the hypotheses whose </s> is among the top K candidates of their sentence: each goes into its
    sentence's `finished` list (until that has K) with its score / `norm` (length ** length_penalty, the
    length counting </s>). top_scores, beam_idx, tok: (n, 2K) candidates of the n active sentences.
    Returns whether any hypothesis ended."""
    found = ((tok[:, :K] == eos) & torch.isfinite(top_scores[:, :K])).nonzero().tolist()
    for i, j in found:
        b = active[i]
        if len(finished[b]) < K:
            row = i * K + int(beam_idx[i, j])
            finished[b].append((float(top_scores[i, j]) / norm, hyps[row, 1:].tolist()))
    return bool(found)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """(B, V) logits -> the same, with -inf for every token outside the top k and outside the smallest set
    whose probability >= top_p (0 and 1.0: no limit)."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked before it already cover top_p
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def check_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> None:
    if temperature < 0:
        raise TransformerError(f"--temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k < 0:
        raise TransformerError(f"--top-k must be >= 0 (0 means no limit), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise TransformerError(f"--top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise TransformerError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")


def _draw(probs: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """One token per row of (B, V) probabilities, by inverting the cumulative distribution at a uniform number
    drawn on the CPU: the same generator state gives the same tokens on a GPU as on the CPU."""
    u = torch.rand(probs.size(0), 1, generator=generator, dtype=torch.float64).to(probs.device)
    cdf = probs.double().cumsum(-1)
    # the first token whose cumulative probability exceeds u; tokens of probability 0 are never picked
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.size(-1) - 1)
    # u * total can round up to the total itself: never let that pick a token of probability 0
    idx = torch.where(probs.gather(1, idx) > 0, idx, probs.argmax(-1, keepdim=True))
    return idx.squeeze(1)


def pick_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """(B, V) next-token logits -> (B,) tokens: the most probable at temperature 0, else a draw from the
    softmax of logits / temperature restricted to the top k / top p (see `sample`)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    # less the largest first (the softmax is the same): a tiny temperature then sends the rest to -inf, never
    # the largest to +inf (which would make every probability NaN)
    probs = filter_logits((logits - logits.amax(-1, keepdim=True)) / temperature, top_k, top_p).softmax(-1)
    return _draw(probs, generator)


@torch.no_grad()
def sample(
    model: TransformerLM,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    context: Optional[int] = None,
    attention_mask: Optional[Tensor] = None,
) -> Iterator[Tensor]:
    """Yield (B,) new tokens one step at a time from a language model.

    Args:
        model: a decoder-only model in eval mode.
        prompt: (B, T) ids to continue, T >= 1; prompts of different lengths are left-padded, with
        attention_mask: (B, T), 1 for tokens and 0 for the padding before them (as Hugging Face's).
        max_new_tokens: how many tokens to yield.
        temperature: divides the logits; 0 picks the most probable token (greedy).
        top_k, top_p: sample only from the k most probable tokens / the smallest set with probability >= p.
        generator: the random source (a CPU generator).
        context: at most this many tokens are seen (see below).
    Temperature 0 picks the most probable token (greedy). `generator` is a CPU generator: random numbers are
    drawn on the CPU whatever the model's device, so a seed gives the same text on any device.

    `context` bounds how many tokens the model sees (a learned positional table bounds it at max_positions):
    a longer prompt is cropped to its last `context` tokens, and when the cache is full it is rebuilt from the
    last 3/4 of the window, so generation can go on for any number of tokens.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    cfg = model.config
    if cfg.max_source_len is not None:  # a learned table: no position beyond it
        context = min(context or cfg.max_source_len, cfg.max_source_len)
    tokens = prompt if context is None else prompt[:, -context:]
    real = None if attention_mask is None else attention_mask[:, -tokens.size(1) :].bool()
    capacity = context or tokens.size(1) + max_new_tokens
    with packed_weights(model.decoder, model.output):  # the same weights at every step: pack them once
        fast = lm_step_decoder(model)  # the lean step where it applies (a CPU), else the modules
        cache = model.decoder.new_cache(capacity)
        logits = model(tokens, cache, attention_mask=real, last_only=True)[:, -1]  # the prompt in one pass
        for _ in range(max_new_tokens):
            nxt = pick_next(logits, temperature, top_k, top_p, generator)
            yield nxt
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if real is not None:
                real = torch.cat([real, real.new_ones(real.size(0), 1)], dim=1)
            if context is not None and cache.length >= context:  # window full: re-read its last 3/4
                cache = model.decoder.new_cache(capacity)
                keep = max(1, context * 3 // 4)
                mask = None if real is None else real[:, -keep:]
                logits = model(tokens[:, -keep:], cache, attention_mask=mask, last_only=True)[:, -1]
            elif fast is not None:
                logits = fast.step(nxt, cache)
            else:
                logits = model(nxt[:, None], cache)[:, -1]


class TextStream:
    """The text that generated tokens add after a prompt, piece by piece, for printing as they come.

    Decoding the new tokens alone would lose what depends on the prompt: a Metaspace (BPE) tokenizer turns
    the space before a word into that word's token, which decodes to the word alone at the start of a text. So
    the prompt and the tokens so far are decoded together and only what is new is returned; a character whose
    bytes are split across tokens (byte-level BPE) waits until it is whole.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
        self.tokenizer, self.ids = tokenizer, list(prompt_ids)
        self.shown = tokenizer.decode(self.ids)

    def push(self, token: int) -> str:
        """Add one generated token; return the text it completes (possibly empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the rest of its bytes
        same = len(os.path.commonprefix([text, self.shown]))  # all of `shown`, unless decoding re-segmented it
        new, self.shown = text[same:], text
        return new


@torch.no_grad()
def translate_texts(
    model: Transformer,
    src_tok: Tokenizer,
    tgt_tok: Tokenizer,
    texts: Sequence[str],
    settings: DecodingSettings = DecodingSettings(),
    batch_size: int = 64,
    should_stop: Optional[Callable[[], bool]] = None,
) -> list[str]:
    """Translate plain sentences: tokenised, batched by length (`batch_size` sentences), decoded as `settings`
    say (greedy, or beam search for beam_size > 1), detokenised, returned in input order. An empty sentence
    translates to an empty string; sources longer than the model can read (`ModelConfig.max_source_len`) are
    truncated with a warning. `should_stop()`, checked between decoding steps, can abandon the work
    (DecodingCancelled)."""
    if batch_size < 1:
        raise TransformerError(f"batch size must be >= 1, got {batch_size}")
    model.eval()
    ids = src_tok.encode_batch(list(texts))
    max_src_len = model.config.max_source_len
    if max_src_len is not None:
        long = sum(len(s) > max_src_len for s in ids)
        if long:
            log.warning("%d input(s) longer than the model's %d positions were truncated", long, max_src_len)
        ids = [s[:max_src_len] for s in ids]
    results = [""] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    todo = [i for i in order if ids[i]]  # an empty source translates to an empty line
    with packed_weights(model.decoder, model.output):  # weights prepared for decoding once, for all batches
        for start in range(0, len(todo), batch_size):
            _translate_chunk(model, tgt_tok, ids, todo[start : start + batch_size], results, settings, should_stop)
    return results


def _translate_chunk(
    model: Transformer,
    tgt_tok: Tokenizer,
    ids: list,
    chunk: list[int],
    results: list[str],
    settings: DecodingSettings,
    should_stop: Optional[Callable[[], bool]] = None,
) -> None:
    """Decode the sentences `chunk` (indices into `ids`) as one batch, writing their texts into `results`."""
    src = pad_batch([ids[i] for i in chunk], model.config.pad_id).to(next(model.parameters()).device)
    s = settings
    if s.beam_size == 1:
        out = greedy(model, src, s.max_len_a, s.max_len_b, max_len=s.max_len, should_stop=should_stop)
    else:
        out = beam_search(model, src, s.beam_size, s.length_penalty, s.max_len_a, s.max_len_b, s.max_len, should_stop)
    for i, toks in zip(chunk, out):
        results[i] = tgt_tok.decode(toks)
