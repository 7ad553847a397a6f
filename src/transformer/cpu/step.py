"""The encoder-decoder's decoder, one new token per row at a time, written lean for the decoding loops.

Greedy and beam search feed each active row one token per step through the decoder stack. `Decoder.forward`
with a cache does the same work, but at decoding's sizes (tens of rows, one token each) the products are small
and most of a step went to what surrounds them: Python work per module call, the fused attention kernel's
set-up for a single query, separate passes for biases, activations and residual additions. `StepDecoder` reads
the same modules once and keeps what a step needs:

- each projection's weight in the form its product takes (see below), prepared once and reused by every
  decoding call until the weights change;
- 1/sqrt(d_k) folded into the query projections, so attention needs no scaling pass;
- the feed-forward activation and the residual additions fused into the products where oneDNN can (tried
  once against the unfused result);
- attention of the single new query as two batched matrix products over the cache, the source's padding as
  an additive bias computed once per source;
- self-attention keys and values in one buffer of the decoding's full length, so a step writes them with one
  copy and never grows a buffer; beam search does not move it when beams swap places (each row's history is
  found through an index of which beam's slot holds it at each position).

It computes what `Decoder.forward` computes, up to the order of float operations (tests compare the two).
Used on the CPU for `Transformer` models in eval mode; everything else (GPUs, decoder-only models, attention
maps) takes the module path. The step is derived from the layers' own definitions: the activation from
`layers.ACTIVATIONS`, the norm placement from `layers.residual_connection`, each norm from its module.

Which way each product multiplies (`_choose`) must not make two processes decode the same input differently:
- in int8 it is fixed by rule, never timed: every product takes this package's int8 kernel where it runs
  (`int8.available()`), else fbgemm, as `int8_weights` packs the modules' own weights. The candidates a timing
  could pick between per shape round differently (the kernel scales each input row, fbgemm the whole input;
  fp32 does not round at all), so a timed pick would change outputs, and BLEU, from one process to the next.
  The kernel's own VNNI and AMX paths give the same bits, so its choice between them by row count is harmless;
- in fp32 and bf16 the timing stays, BLAS against oneDNN's packed layout (oneDNN wins the larger products by up
  at decoding's shapes, so no fixed rule keeps the speed). They sum in different orders and differ in the
  last bits, so the winner at each shape is decided once per machine and recorded in a file under
  this machine's record (`decisions`, the "step" section): every later process on the machine takes the
  recorded choice. Where that record cannot be written, BLAS is taken, fixed rather than timed anew.
`TRANSFORMER_STEP_PRODUCT=mkl|onednn|int8|vnni` forces one kind for every product where it is available.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..layers import ACTIVATIONS, residual_connection
from . import decisions, int8, machine, timing
from .linear import Linear
from .paths import cpu_paths, onednn_usable

log = logging.getLogger(__name__)


class _Product:
    """y = act(x W^T + b) (+ residual) for one projection of the step, by one of this machine's ways of
    multiplying (chosen by `_choose`: by rule in int8, by a timing recorded once per machine in fp32 and bf16):

    - "mkl": torch.addmm with the weight stored transposed, (in, out): BLAS's cheapest call (the least fixed
      cost);
    - "onednn": the weight packed into oneDNN's blocked layout (more fixed cost per call, but faster products
      for large weights), where it works on this CPU;
    - "int8" (inside `int8_weights()`, where the kernel below does not run): fbgemm with int8 weights, each
      output row scaled to [-127, 127], the input quantised on the fly with one scale for all its rows;
    - "vnni" (inside `int8_weights()`, where `int8.available()`): the same int8 weights through this package's
      int8 kernel (AVX-512 VNNI, AMX), each input row with its own scale; it also adds the ReLU and the
      residual as it writes the result.
    Under bf16 autocast the candidates take bf16 weights, converted once."""

    def __init__(
        self, weight: Tensor, bias: Optional[Tensor], mode: str, activation: Optional[str] = None, rows: int = 32
    ) -> None:
        self.act_fn = ACTIVATIONS[activation] if activation else None
        self.promote = mode == "bf16"  # bf16 products, fp32 residual stream: add out of place, as autocast does
        relu = activation == "relu"
        self.kind, self.fn = _choose(weight.detach(), None if bias is None else bias.detach(), mode, relu, rows)
        if relu and self.kind in ("int8", "vnni"):  # applied inside the product
            self.act_fn = None

    def __call__(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if self.kind == "vnni" and self.act_fn is None:  # the kernel adds the residual (after its ReLU, if any)
            return self.fn(x, residual)
        y = self.fn(x)
        if self.act_fn is not None:
            y = self.act_fn(y)
        if residual is None:
            return y
        return residual + y if self.promote else y.add_(residual)


def _kinds(mode: str) -> list[str]:
    """The ways this machine can multiply in `mode` ("fp32", "bf16" or "int8"). oneDNN's packed layout is a
    candidate wherever it works, even where `cpu_paths()` found it slower at its one test shape: the step
    times it at each of its own shapes."""
    kinds = ["mkl"]
    if onednn_usable(torch.bfloat16 if mode == "bf16" else torch.float32):
        kinds.append("onednn")
    if mode == "int8":
        kinds.append("int8")
        if int8.kind() == "vnni":
            kinds.append("vnni")
    return kinds


def _build(
    kind: str, weight: Tensor, bias: Optional[Tensor], mode: str, relu: bool = False
) -> Callable[[Tensor], Tensor]:
    """x -> x weight^T + bias (then ReLU if `relu`, int8 only), the `kind` way, its weight prepared now.
    "vnni" takes (x, residual) and adds the residual too."""
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    b = None if bias is None else bias.to(dtype)
    if kind == "vnni":
        packed = int8.pack(weight, bias)
        return lambda x, residual=None: int8.linear(x, packed, relu, residual)
    if kind == "int8":
        q = int8.pack_fbgemm(weight, bias)
        op = torch.ops.quantized.linear_relu_dynamic if relu else torch.ops.quantized.linear_dynamic
        return lambda x: op(x, q)
    if kind == "onednn":
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), 32)
        linear = torch.ops.mkldnn._linear_pointwise.default
        if dtype == torch.float32:
            return lambda x: linear(x, packed, b, "none", [], "")
        return lambda x: linear(x.to(dtype), packed, b, "none", [], "")
    wt = weight.to(dtype).t().contiguous()  # (in, out)
    if dtype == torch.float32:  # the step's activations are fp32 already
        return (lambda x: torch.mm(x, wt)) if b is None else (lambda x: torch.addmm(b, x, wt))
    if b is None:
        return lambda x: torch.mm(x.to(dtype), wt)
    return lambda x: torch.addmm(b, x.to(dtype), wt)


# (machine, product) -> the kind recorded for it in `decisions`, read once per process and product
_chosen: dict[tuple[str, str], str] = {}


def _choose(
    weight: Tensor, bias: Optional[Tensor], mode: str, relu: bool = False, rows: int = 32
) -> tuple[str, Callable[[Tensor], Tensor]]:
    """The kind of product for `weight` in `mode`, and that product (see the module's docstring): forced by
    `TRANSFORMER_STEP_PRODUCT` where it names one available; in int8 the kernel where it runs, else fbgemm, by
    rule; in fp32 and bf16 the fastest at this shape, as this machine recorded it (timed the first time)."""
    kinds = _kinds(mode)
    forced = machine.switch("STEP_PRODUCT")
    if forced in kinds:
        kind = forced
    elif mode == "int8":
        kind = "vnni" if "vnni" in kinds else "int8"
    elif len(kinds) == 1:
        kind = kinds[0]
    else:
        product = f"{mode} {weight.size(0)}x{weight.size(1)} bias={bias is not None} among {','.join(kinds)}"
        if rows != 32:  # timed at another typical row count (the decoder-only step's single row)
            product += f" rows={rows}"
        key = (machine.machine_key(), product)
        fns: dict[str, Callable[[Tensor], Tensor]] = {}

        def timed() -> str:
            fns.update((k, _build(k, weight, bias, mode, relu)) for k in kinds)
            return _fastest(fns, weight.size(1), rows)

        if key not in _chosen:
            _chosen[key] = _recorded(product, kinds, timed)
        kind = _chosen[key]
        if kind in fns:  # timed just now: already built
            return kind, fns[kind]
    return kind, _build(kind, weight, bias, mode, relu)


def _fastest(fns: dict[str, Callable[[Tensor], Tensor]], in_features: int, rows: int = 32) -> str:
    """The fastest of `fns` at `rows` rows (32: a translation batch's; 1: a chat's). Each timing starts with the
    weights out of the core's caches, as a decoding step meets them (every other weight of the step came in
    between): timed with them cached, fp32 won products that int8, with a quarter of the bytes to read, wins in
    decoding."""
    x = timing.fixed(rows, in_features)
    return timing.fastest({k: functools.partial(fn, x) for k, fn in fns.items()}, before_each=timing.evicting())


def _recorded(product: str, kinds: list[str], decide: Callable[[], str]) -> str:
    """The kind this machine recorded for `product`, else `decide()`'s, recorded now for every later process.
    Where the record cannot be read or written: BLAS (kinds[0]), fixed rather than this process's timing."""
    try:
        return decisions.recorded("step", product, decide, lambda kind: kind in kinds)
    except OSError as e:
        log.debug("step products: %s unusable (%s); taking %s for %s", decisions.path(), e, kinds[0], product)
        return kinds[0]


def product_mode(linear: Linear) -> str:
    """How to decode with `linear` now: "bf16" under CPU bf16 autocast, "int8" inside int8_weights(), else
    "fp32"."""
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return "bf16"
    return "int8" if linear.prepared is not None and linear.prepared.int8 is not None else "fp32"


def scaled_rows(linear: Linear, rows: int, scale: float) -> tuple[Tensor, Optional[Tensor]]:
    """`linear`'s weight and bias with their first `rows` output rows multiplied by `scale`."""
    w = linear.weight.detach().clone()
    w[:rows] *= scale
    b = None
    if linear.bias is not None:
        b = linear.bias.detach().clone()
        b[:rows] *= scale
    return w, b


class _Layer:
    """One decoder layer's products and LayerNorms, as a step needs them."""

    def __init__(self, layer: nn.Module, activation: str) -> None:
        E = layer.self_attn.d_model
        scale = 1.0 / math.sqrt(layer.self_attn.head_dim)
        self.norm_first = layer.norm_first
        self.qkv = make_product(layer.self_attn.qkv_proj, *scaled_rows(layer.self_attn.qkv_proj, E, scale))
        self.self_out = make_product(layer.self_attn.out_proj)
        self.cross_q = make_product(layer.cross_attn.q_proj, *scaled_rows(layer.cross_attn.q_proj, E, scale))
        self.cross_kv = layer.cross_attn.kv_proj  # once per source: the module as it is
        self.cross_out = make_product(layer.cross_attn.out_proj)
        self.ff1 = make_product(layer.ff.linear1, activation=activation)
        self.ff2 = make_product(layer.ff.linear2)
        self.norms = [bound_norm(n) for n in (layer.self_attn_norm, layer.cross_attn_norm, layer.ff_norm)]


def bound_norm(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """`module` (a norm layer) as a function of x: a LayerNorm's arguments bound once (a module call costs more
    Python time than the norm itself at a step's size); any other kind of norm is called as it is."""
    if type(module) is nn.LayerNorm:
        shape, weight, bias, eps = module.normalized_shape, module.weight, module.bias, module.eps
        return lambda x: torch.layer_norm(x, shape, weight, bias, eps)
    return module


def make_product(
    linear: Linear,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = None,
    rows: int = 32,
) -> _Product:
    """`linear` (or `weight` and `bias` in its place) as a prepared product, its kind chosen for `rows` rows."""
    if weight is None:
        weight, bias = linear.weight, linear.bias
    return _Product(weight, bias, product_mode(linear), activation, rows)


class StepState:
    """What decoding a batch keeps between steps, per layer: self-attention keys and values in one buffer
    (2, B, H, capacity, K, D), the K beams of each of B sentences side by side at each position (and the same
    viewed as (2, B * H, capacity * K, D)); the source's keys, stored transposed (B * H, D, S), and values
    (B * H, S, D); the source's padding as a bias (B * H, 1, S) (None: no padding); the positional vector of
    every position the decoding can reach. The source's keys are transposed once because a query's product with
    them is fastest that way (the growing self-attention keys are not: writing each step's key across a
    transposed buffer cost more than it saved).

    Beam search never moves the self-attention cache when beams swap places (that copy was a fifth of a beam
    step): each row writes its step's key and value into its own slot, and `ancestry` (n, capacity) records,
    for each row and position, which of its sentence's K slots holds its history there."""

    def __init__(
        self,
        self_kv: list[Tensor],
        cross: list[tuple[Tensor, Tensor]],
        bias: Optional[Tensor],
        heads: int,
        positions: Tensor,
        beams: int,
    ) -> None:
        self.self_kv, self.cross, self.bias, self.heads = self_kv, cross, bias, heads
        self.flat = [kv.flatten(3, 4).flatten(1, 2) for kv in self_kv]  # (2, B * H, capacity * K, D) views
        self.beams = beams  # rows per source sentence: each sentence's K beams share its keys/values
        self.positions = positions  # (capacity, E): the positional vector of each step
        self.spare: list[Optional[Tensor]] = [None] * len(self_kv)  # second buffers, for sentences leaving
        self.length = 0
        B, capacity = self_kv[0].size(1), self_kv[0].size(3)
        self.ancestry = None if beams == 1 else positions.new_zeros(B * beams, capacity, dtype=torch.long)
        self.index: Optional[Tensor] = None  # this step's (B * H, K, L) cache positions of each row's history

    def next_index(self) -> None:
        """Before a step: each row writes its own slot at the new position; find where each row's history is in
        its sentence's flattened cache (position t, slot k: t * K + k), for every head."""
        if self.ancestry is None:
            return
        n, K, L = self.ancestry.size(0), self.beams, self.length + 1
        self.ancestry[:, self.length] = torch.arange(K).repeat(n // K)
        index = self.ancestry[:, :L] + torch.arange(0, L * K, K)
        self.index = index.view(n // K, 1, K, L).expand(-1, self.heads, -1, -1).reshape(-1, K, L)

    def reorder(self, rows: Tensor, sentences: Optional[Tensor] = None) -> None:
        """Keep batch rows `rows` in that order (beams that survive, sentences still decoding); `sentences`:
        the source sentences still decoding, in order (None: all of them, each row keeping its sentence)."""
        if self.ancestry is not None:  # rows take over their parents' histories; the cache stays where it is
            self.ancestry = self.ancestry.index_select(0, rows)
        elif sentences is None:
            sentences = rows  # one row per sentence
        if sentences is None:
            return
        L = self.length
        for i, kv in enumerate(self.self_kv):
            spare = self.spare[i]
            if spare is None or spare.size(1) != sentences.numel():
                spare = kv.new_empty(2, sentences.numel(), *kv.shape[2:])
            # only the filled positions are copied
            torch.index_select(kv[:, :, :, :L], 1, sentences, out=spare[:, :, :, :L])
            self.spare[i], self.self_kv[i], self.flat[i] = kv, spare, spare.flatten(3, 4).flatten(1, 2)
        if sentences is not rows:
            H = self.heads
            self.cross = [(_rows_of(k, sentences, H), _rows_of(v, sentences, H)) for k, v in self.cross]
            if self.bias is not None:
                self.bias = _rows_of(self.bias, sentences, H)


def _rows_of(x: Tensor, sentences: Tensor, heads: int) -> Tensor:
    """The rows of sentences `sentences` of x (B * heads, ...)."""
    return x.view(-1, heads, *x.shape[1:]).index_select(0, sentences).flatten(0, 1)


class StepDecoder:
    """A `Transformer`'s decoder and output layer, prepared for decoding one token per row per step.

    `start(memory, memory_mask, capacity)` makes a `StepState` for a batch; `step(tokens, state)` takes (n,)
    newest tokens and gives (n, V) next-token logits."""

    def __init__(self, model: nn.Module) -> None:
        cfg, dec = model.config, model.decoder
        self.heads, self.head_dim, self.d_model = cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.d_model
        self.embedding, self.embed_scale = dec.embed.embedding.weight.detach(), dec.embed.scale
        self.positions = dec.positions
        self.layers = [_Layer(layer, cfg.activation) for layer in dec.layers]
        self.final_norm = None if dec.norm is None else bound_norm(dec.norm)
        self.output = make_product(model.output)
        self.output_module = model.output  # its forward hooks (logit processors) run on each step's logits

    def start(self, memory: Tensor, memory_mask: Tensor, capacity: int, beams: int = 1) -> StepState:
        """memory (B, S, E) and its mask (B, 1, 1, S) -> the state for decoding up to `capacity` tokens in
        `beams` rows per sentence (rows b * beams ... b * beams + beams - 1 decode sentence b)."""
        n, S, E = memory.shape
        H, D = self.heads, self.head_dim
        cross = []
        for layer in self.layers:
            k, v = layer.cross_kv(memory).split(E, dim=-1)  # (n, S, E) each
            cross.append(
                (
                    k.view(n, S, H, D).permute(0, 2, 3, 1).reshape(n * H, D, S),  # copies, once
                    v.view(n, S, H, D).transpose(1, 2).reshape(n * H, S, D),
                )
            )
        dtype = cross[0][0].dtype
        bias = None
        keep = memory_mask.reshape(n, S)
        if not bool(keep.all()):
            empty = ~keep.any(1)  # a source of padding only: attend to zeros (the module path's zero output)
            for _, v in cross:
                v.view(n, H, S, D)[empty] = 0
            keep = keep | empty[:, None]
            bias = torch.zeros(n, S, dtype=dtype, device=memory.device).masked_fill_(~keep, float("-inf"))
            bias = bias[:, None, None, :].expand(n, H, 1, S).reshape(n * H, 1, S)
        self_kv = [memory.new_empty(2, n, H, capacity, beams, D, dtype=dtype) for _ in self.layers]
        table = self.positions(memory.new_zeros(1, capacity, E))[0]  # (capacity, E), as the module adds them
        return StepState(self_kv, cross, bias, H, table, beams)

    def step(self, tokens: Tensor, state: StepState) -> Tensor:
        """(n,) newest tokens -> (n, V) logits of the tokens after them."""
        pos, H, D, K = state.length, self.heads, self.head_dim, state.beams
        n = tokens.numel()
        state.next_index()
        x = torch.add(state.positions.select(0, pos), torch.embedding(self.embedding, tokens), alpha=self.embed_scale)
        for layer, kv, flat, (ck, cv) in zip(self.layers, state.self_kv, state.flat, state.cross):
            norm_self, norm_cross, norm_ff = layer.norms

            def self_attention(h: Tensor, residual: Tensor) -> Tensor:
                """This step's key and value join the cache; the query attends to all of it."""
                qkv = layer.qkv(h).view(n, 3, H, D)  # the query already scaled by 1/sqrt(D)
                # (explicit select/narrow: indexing with slices costs more Python time than the copy itself)
                kv.select(3, pos).copy_(qkv.narrow(1, 1, 2).view(-1, K, 2, H, D).permute(2, 0, 3, 1, 4))
                return layer.self_out(self._self_attention(qkv.select(1, 0), flat, state), residual=residual)

            def cross_attention(h: Tensor, residual: Tensor) -> Tensor:
                return layer.cross_out(self._cross_attention(layer.cross_q(h), ck, cv, state), residual=residual)

            def feed_forward(h: Tensor, residual: Tensor) -> Tensor:
                return layer.ff2(layer.ff1(h), residual=residual)

            x = residual_connection(x, norm_self, self_attention, layer.norm_first)
            x = residual_connection(x, norm_cross, cross_attention, layer.norm_first)
            x = residual_connection(x, norm_ff, feed_forward, layer.norm_first)
        if self.final_norm is not None:
            x = self.final_norm(x)
        state.length += 1
        return output_hooks(self.output_module, x, self.output(x))

    def _self_attention(self, q: Tensor, flat: Tensor, state: StepState) -> Tensor:
        """(n, H, D) scaled queries -> (n, E) attention over each row's history in the cache `flat`
        (2, B * H, capacity * K, D). With K beams, a sentence's K queries meet all K slots' keys in one product
        (the same bytes read as K products with one slot each), each row keeps the scores of its own history
        (`state.index`), and its weights, spread back over the K slots, meet the values the same way."""
        n, H, D, K = q.size(0), self.heads, self.head_dim, state.beams
        L = state.length + 1
        k, v = flat.narrow(2, 0, L * K).unbind(0)  # (BH, L * K, D)
        if K == 1:
            s = torch.bmm(q.reshape(n * H, 1, D), k.transpose(1, 2))  # (nH, 1, L)
            return torch.bmm(torch.softmax(s, -1), v).view(n, H * D)
        B = n // K
        q = q.reshape(B, K, H, D).transpose(1, 2).reshape(B * H, K, D)
        s = torch.bmm(q, k.transpose(1, 2)).gather(2, state.index)  # (BH, K, L)
        p = torch.softmax(s, -1)
        weights = p.new_zeros(B * H, K, L * K).scatter_(2, state.index, p)
        return torch.bmm(weights, v).view(B, H, K, D).transpose(1, 2).reshape(n, H * D)

    def _cross_attention(self, q: Tensor, k: Tensor, v: Tensor, state: StepState) -> Tensor:
        """(n, E) scaled queries -> (n, E) attention over the source: the K beams of a sentence query its keys
        (B * H, D, S) and values (B * H, S, D) together, as K rows of one product per sentence and head."""
        n, E = q.shape
        H, D, K = self.heads, self.head_dim, state.beams
        B = n // K
        q = q.view(n * H, 1, D) if K == 1 else q.view(B, K, H, D).transpose(1, 2).reshape(B * H, K, D)
        s = torch.bmm(q, k) if state.bias is None else torch.baddbmm(state.bias, q, k)  # (BH, K, S)
        a = torch.bmm(torch.softmax(s, -1), v)  # (BH, K, D)
        return a.view(n, E) if K == 1 else a.view(B, H, K, D).transpose(1, 2).reshape(n, E)


def output_hooks(output: nn.Module, x: Tensor, logits: Tensor) -> Tensor:
    """`logits` after the forward hooks of the output layer (logit processors) have run on them, as they run
    when the module is called."""
    for hook in output._forward_hooks.values():
        changed = hook(output, (x,), logits)
        logits = logits if changed is None else changed
    return logits


def hooked(model: nn.Module) -> bool:
    """Does a hook expect to see the decoder's modules run (any hook but a forward hook on the output layer)?"""
    from torch.nn.modules import module as M

    if M._global_forward_hooks or M._global_forward_pre_hooks or model.output._forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.decoder.modules())


def _classic_blocks(cfg) -> bool:
    """Does the model use the blocks this step is written for (added positions, one key/value head per query
    head of width d_model / n_heads, a plain feed-forward)? Rotary positions, grouped-query attention, QK-norm,
    gated feed-forwards and sliding windows decode by the module path."""
    return (
        cfg.positional != "rope"
        and cfg.kv_heads == cfg.n_heads
        and cfg.head_size * cfg.n_heads == cfg.d_model
        and cfg.feed_forward == "plain"
        and not cfg.qk_norm
        and not cfg.sliding_window
    )


def step_decoder(model: nn.Module) -> Optional[StepDecoder]:
    """The `StepDecoder` of an encoder-decoder `model` for decoding now, or None where the module path decodes
    (GPU, training mode, a decoder-only model, a model with weights in another dtype). Inside a
    `packed_weights(model)` or `int8_weights(model)` block it is prepared once and reused by every decoding call
    of the block (the decoding functions open one per call; `translate_texts` one for all its batches)."""
    if model.training or getattr(model.config, "arch", None) == "decoder-only" or not hasattr(model, "encoder"):
        return None
    if not _classic_blocks(model.config):
        return None
    return prepared_once(model, "step", StepDecoder)


def prepared_once(model: nn.Module, key: str, build: Callable[[nn.Module], object]) -> Optional[object]:
    """`build(model)` for a CPU fp32 model without hooks on its decoder (else None: the module path decodes).
    Inside a `packed_weights(model)` or `int8_weights(model)` block, it is built once and reused by every
    decoding call of the block."""
    weight = model.output.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or hooked(model):
        return None
    if getattr(model.config, "lora", None) is not None:  # unmerged adapters: the modules add their updates
        return None
    linears = [m for m in model.decoder.modules() if isinstance(m, Linear)] + [model.output]
    tokens = [m.prepared for m in linears]
    how = ([product_mode(m) for m in linears], cpu_paths())
    found = None if tokens[-1] is None else tokens[-1].derived.get(key)
    if found is not None and found[1] == how and all(a is b for a, b in zip(found[0], tokens)):
        return found[2]
    prepared = build(model)
    # Inside packed_weights()/int8_weights() blocks the weights must not change: keep what was prepared for the
    # next call, on the output layer, until the block ends (it clears it). Outside them, nothing is kept: an
    # optimizer's in-place step (the fused AdamW's) changes weights without bumping their version counters.
    if all(t is not None for t in tokens):
        model.output.prepared.derived[key] = (tokens, how, prepared)
    return prepared
