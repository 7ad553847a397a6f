"""The models, built from the same layers: encoder-decoder `Transformer`, decoder-only `TransformerLM`,
encoder-only `TransformerEncoder`.

    source ids -> embedding * sqrt(d) + position -> N x [self-attn, feed-forward]                 = memory
    target ids -> embedding * sqrt(d) + position -> N x [masked self-attn, cross-attn(memory), ff] -> linear
    -> logits (softmax gives next-token probabilities)
    encoder-only: memory -> pooled sentence vector -> class logits, or a sentence embedding

Target sequences are right-padded: the causal mask alone keeps real positions from seeing the pads after them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import KVCache, causal_mask, padding_mask
from .config import ModelConfig
from .cpu.linear import Linear
from .dropout import Dropout
from .errors import TransformerError
from .layers import TokenEmbedding, TransformerLayer, positional_encoding
from .loss import label_smoothed_loss
from .norms import norm_layer
from .rope import RotaryEmbedding


class Encoder(nn.Module):
    """Source ids -> contextual vectors ("memory"): embedding, positions (and token types, and a LayerNorm, as
    BERT has), dropout, N layers, optional final norm. `forward(src (B, S), mask (B, 1, 1, S), attn_maps,
    token_types (B, S) or None)` -> (B, S, E); `attn_maps`, a list, receives each layer's attention weights."""

    def __init__(self, cfg: ModelConfig, embed: TokenEmbedding) -> None:
        super().__init__()
        self.embed = embed
        self.positions = positional_encoding(cfg)
        self.rotary = RotaryEmbedding(cfg) if cfg.positional == "rope" else None
        self.token_types = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.embed_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.embed_norm else None
        self.dropout = Dropout(cfg.dropout)
        self.layers = nn.ModuleList(TransformerLayer(cfg, cross_attention=False) for _ in range(cfg.n_encoder_layers))
        self.norm = norm_layer(cfg) if cfg.final_norm else None

    def forward(
        self,
        src: Tensor,
        mask: Optional[Tensor],
        attn_maps: Optional[list] = None,
        token_types: Optional[Tensor] = None,
    ) -> Tensor:
        x = self.embed(src)
        rotary = None
        if self.rotary is not None:  # sources are right-padded: every row's positions are 0 .. S - 1
            rotary = self.rotary(torch.arange(src.size(1), device=src.device)[None])
        else:
            x = self.positions(x)
        if self.token_types is not None:  # no types given: every token is of type 0, as in BERT
            x = x + (self.token_types(token_types) if token_types is not None else self.token_types.weight[0])
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x, mask=mask, attn_maps=attn_maps, rotary=rotary)
        return self.norm(x) if self.norm is not None else x


class DecoderCache:
    """Per-layer key/value caches for incremental decoding (self-attention keys/values (B, H_kv, t, D) growing
    with each step; the source's, for cross-attention, computed once), plus how many positions are cached and,
    once a left-padded prompt has been read, which of them are real tokens (`real`, (B, length) bool)."""

    def __init__(self, n_layers: int, capacity: int, cross: bool) -> None:
        self.layers = [(KVCache(capacity), KVCache(static=True) if cross else None) for _ in range(n_layers)]
        self.length = 0
        self.real: Optional[Tensor] = None  # None: every cached position is a real token

    def reorder(self, index: Tensor, cross: bool = True) -> None:
        """Keep batch rows `index`, in that order (beam search, dropping finished sentences). `cross=False`
        leaves the source keys/values alone: right when every row keeps the same source sentence (beams of one
        sentence swapping places), which saves copying them at every beam-search step."""
        for self_cache, cross_cache in self.layers:
            self_cache.reorder(index)
            if cross and cross_cache is not None:
                cross_cache.reorder(index)
        if self.real is not None:
            self.real = self.real.index_select(0, index)

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions only (a conversation that changed after them is read again)."""
        for self_cache, _ in self.layers:
            self_cache.truncate(length)
        self.length = min(self.length, length)
        if self.real is not None:
            self.real = self.real[:, : self.length]

    def row_lengths(self) -> Tensor:
        """(B,) how many real tokens each row holds (they are the last ones of its row)."""
        if self.real is None:
            return torch.full((self.batch_size(),), self.length, dtype=torch.long, device=self.layers[0][0].k.device)
        return self.real.sum(1)

    def batch_size(self) -> int:
        k = self.layers[0][0].k if self.layers else None
        return 0 if k is None else k.size(0)

    def join(self, other: Optional["DecoderCache"], capacity: int, keep: Optional[Tensor] = None) -> None:
        """Continuous batching: keep rows `keep` of these (None: all), add `other`'s rows after them (None: none),
        and drop the columns no row uses any more.

        Rows are right-aligned, every row's tokens ending at the last cached position: a row that joins later
        has padding before its tokens (marked not real, so nothing attends to it, and positions count real
        tokens only, so each row's positions are the ones it would have decoded alone). The buffers are
        rebuilt with room for `capacity` positions, at least the longest row. Self-attention caches only (a
        decoder-only model's)."""
        parts = []  # (cache, its rows kept or None, the columns they use: the longest row's)
        for c, rows in ((self, keep), (other, None)):
            if c is None or not c.batch_size() or (rows is not None and not rows.numel()):
                continue
            lengths = c.row_lengths() if rows is None else c.row_lengths().index_select(0, rows)
            parts.append((c, rows, int(lengths.max())))
        length = max((n for *_, n in parts), default=0)
        if length > capacity:
            raise ValueError(f"a row of {length} positions does not fit a capacity of {capacity}")
        real = []  # read before the buffers are rebuilt
        for c, rows, n in parts:
            k = c.layers[0][0].k
            tail = c.real[:, -n:] if c.real is not None else torch.ones(k.size(0), n, dtype=torch.bool, device=k.device)
            tail = tail if rows is None else tail.index_select(0, rows)
            real.append(F.pad(tail, (length - n, 0), value=False))
        for i, (mine, cross) in enumerate(self.layers):
            if cross is not None:
                raise ValueError("join: a decoder-only model's cache has no cross-attention caches")
            mine.regrid([(c.layers[i][0], n, rows) for c, rows, n in parts], length, capacity)
        self.real = torch.cat(real) if real else None
        self.length = length


def _self_attention_mask(
    T: int, offset: int, real: Optional[Tensor], window: int, device: torch.device
) -> tuple[Optional[Tensor], bool]:
    """The decoder's self-attention mask for T new tokens after `offset` cached ones: causal; within the
    last `window` positions if window > 0; only real (not padding) keys if `real` (B, offset + T) is given.
    Returns (mask or None, is_causal): the plain causal case is left to the fused kernel's `is_causal`."""
    keys = offset + T
    if real is None and (window == 0 or keys <= window):
        if offset == 0 and T > 1:
            return None, True
        return (causal_mask(T, device, keys=keys) if T > 1 else None), False
    mask = causal_mask(T, device, keys=keys)
    if window:  # key j is seen from query i only if i - j < window
        query_at = torch.arange(offset, keys, device=device)[:, None]
        mask = mask & (torch.arange(keys, device=device)[None] > query_at - window)
    if real is not None:
        mask = mask & real[:, None, None, :]
    return mask, False


class Decoder(nn.Module):
    """Target ids (+ memory) -> hidden states; causal. Without cross-attention this is the decoder-only
    language model's stack.

    `forward(tgt (B, T), memory (B, S, E), memory_mask (B, 1, 1, S), cache, attn_maps, attention_mask)` ->
    (B, T, E). With a cache, `tgt` holds only the new tokens and their keys/values are appended to it.
    `attention_mask` (B, T), as Hugging Face's (1/True: a token, 0/False: padding), lets a batch of
    left-padded prompts be read at once: each row's positions start at its first token, and no token
    attends to padding.
    """

    def __init__(self, cfg: ModelConfig, embed: TokenEmbedding, cross_attention: bool) -> None:
        super().__init__()
        self.embed = embed
        self.positions = positional_encoding(cfg)
        self.rotary = RotaryEmbedding(cfg) if cfg.positional == "rope" else None
        self.window = cfg.sliding_window
        self.dropout = Dropout(cfg.dropout)
        self.cross_attention = cross_attention
        self.layers = nn.ModuleList(TransformerLayer(cfg, cross_attention) for _ in range(cfg.n_decoder_layers))
        self.norm = norm_layer(cfg) if cfg.final_norm else None

    def new_cache(self, capacity: int = 64) -> DecoderCache:
        return DecoderCache(len(self.layers), capacity, self.cross_attention)

    def forward(
        self,
        tgt: Tensor,
        memory: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        cache: Optional[DecoderCache] = None,
        attn_maps: Optional[list] = None,
        attention_mask: Optional[Tensor] = None,
        segments: Optional[Tensor] = None,
    ) -> Tensor:
        offset = cache.length if cache is not None else 0
        B, T = tgt.shape
        real = _real_tokens(cache, attention_mask, B, T, tgt.device)  # (B, offset + T), or None: all real
        if real is None:
            positions = torch.arange(offset, offset + T, device=tgt.device)[None]  # (1, T)
        else:  # each row counts only its real tokens (padding takes position 0, unseen)
            positions = (real.long().cumsum(1) - 1).clamp(min=0)[:, offset:]
        mask, is_causal = _self_attention_mask(T, offset, real, self.window, tgt.device)
        if segments is not None:  # packed examples: each attends within itself, its positions from 0
            mask, is_causal, positions = _within_segments(segments, mask, is_causal)
        x = self.embed(tgt)
        rotary = None
        if self.rotary is not None:
            rotary = self.rotary(positions)
        elif real is None:
            x = self.positions(x, offset)
        else:
            x = self.positions(x, positions=positions)
        x = self.dropout(x)
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            x = layer(x, mask, is_causal, memory, memory_mask, layer_cache, attn_maps, rotary)
        if cache is not None:
            cache.length += T
            cache.real = real
        return self.norm(x) if self.norm is not None else x


def _within_segments(segments: Tensor, mask: Optional[Tensor], is_causal: bool) -> tuple[Tensor, bool, Tensor]:
    """For a row of packed examples, `segments` (B, T) numbering them: the self-attention mask restricted to
    keys of the query's own example, and each token's position within its example."""
    B, T = segments.shape
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    causal = mask if mask is not None else causal_mask(T, segments.device)
    mask = causal & same[:, None]
    index = torch.arange(T, device=segments.device).expand(B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    return mask, False, index - first


def _real_tokens(
    cache: Optional[DecoderCache], attention_mask: Optional[Tensor], B: int, T: int, device: torch.device
) -> Optional[Tensor]:
    """(B, cached + T) bool: which positions hold real tokens, the cached ones and the new ones; None while
    all of them do (the common case, which keeps the plain causal mask)."""
    before = cache.real if cache is not None else None
    new = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool)
    if new is not None and bool(new.all()):
        new = None
    if before is None and new is None:
        return None
    offset = cache.length if cache is not None else 0
    if before is None:
        before = torch.ones(B, offset, dtype=torch.bool, device=device)
    if new is None:
        new = torch.ones(B, T, dtype=torch.bool, device=device)
    return torch.cat([before, new], dim=1)


def _token_embedding(cfg: ModelConfig, vocab_size: int) -> TokenEmbedding:
    return TokenEmbedding(vocab_size, cfg.d_model, cfg.pad_id, scale=cfg.scale_embeddings)


def _init_linears(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Transformer(nn.Module):
    """The encoder-decoder Transformer of "Attention Is All You Need".

    `forward(src, tgt_in)` gives next-token logits (B, T, V_tgt) for every target position (teacher forcing);
    `encode` and `decode` are the two halves, used step by step by `transformer.generate`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.check_vocab()
        self.config = cfg
        tgt_embed = _token_embedding(cfg, cfg.tgt_vocab_size)
        src_embed = tgt_embed if cfg.tie_embeddings == "all" else _token_embedding(cfg, cfg.src_vocab_size)
        self.encoder = Encoder(cfg, src_embed)
        self.decoder = Decoder(cfg, tgt_embed, cross_attention=True)
        self.output = Linear(cfg.d_model, cfg.tgt_vocab_size, bias=cfg.output_bias)
        _init_linears(self)
        if cfg.tie_embeddings != "none":
            self.output.weight = tgt_embed.weight

    def encode(self, src: Tensor, attn_maps: Optional[list] = None) -> tuple[Tensor, Tensor]:
        """(B, S) source ids (right-padded with pad_id) -> memory (B, S, E) and its mask (B, 1, 1, S)."""
        mask = padding_mask(src, self.config.pad_id)
        return self.encoder(src, mask, attn_maps), mask

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_mask: Tensor,
        cache: Optional[DecoderCache] = None,
        attn_maps: Optional[list] = None,
    ) -> Tensor:
        """(B, T) target ids -> logits (B, T, V). With a cache, `tgt` holds only the new tokens."""
        return self.output(self.decoder(tgt, memory, memory_mask, cache, attn_maps))

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        """src (B, S) and tgt (B, T) ids (tgt starting with <s>) -> next-token logits (B, T, V_tgt)."""
        memory, memory_mask = self.encode(src)
        return self.decode(tgt, memory, memory_mask)

    def loss(self, src: Tensor, tgt_in: Tensor, tgt_out: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Label-smoothed cross entropy of predicting `tgt_out` from `src` and `tgt_in` (its shift by one),
        averaged over non-pad target tokens. The output layer runs only on those tokens."""
        memory, memory_mask = self.encode(src)
        hidden = self.decoder(tgt_in, memory, memory_mask)
        keep = tgt_out != self.config.pad_id
        return label_smoothed_loss(self.output(hidden[keep]), tgt_out[keep], label_smoothing)


class TransformerLM(nn.Module):
    """Decoder-only language model: the decoder stack without cross-attention, output tied to the input
    embedding unless `tie_embeddings` is "none"."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.check_vocab()
        self.config = cfg
        embed = _token_embedding(cfg, cfg.tgt_vocab_size)
        self.decoder = Decoder(cfg, embed, cross_attention=False)
        self.output = Linear(cfg.d_model, cfg.tgt_vocab_size, bias=cfg.output_bias)
        _init_linears(self)
        if cfg.tie_embeddings != "none":
            self.output.weight = embed.weight

    def forward(
        self,
        ids: Tensor,
        cache: Optional[DecoderCache] = None,
        attn_maps: Optional[list] = None,
        attention_mask: Optional[Tensor] = None,
        last_only: bool = False,
        segments: Optional[Tensor] = None,
    ) -> Tensor:
        """(B, T) ids -> next-token logits (B, T, V). With a cache, `ids` holds only the new tokens.
        `attention_mask` (B, T): 1 for tokens, 0 for the left padding of a batch of prompts (see `Decoder`).
        `last_only`: the logits of the last position only, (B, 1, V), what decoding after a prompt needs (the
        output layer over a long prompt's every position can cost as much as the rest of the model).
        `segments` (B, T): the example each token belongs to, for rows that pack several (no attention across
        examples, positions from each example's start)."""
        hidden = self.decoder(ids, cache=cache, attn_maps=attn_maps, attention_mask=attention_mask, segments=segments)
        return self.output(hidden[:, -1:] if last_only else hidden)

    def loss(
        self,
        ids: Tensor,
        targets: Tensor,
        label_smoothing: float = 0.0,
        segments: Optional[Tensor] = None,
        counts: Optional[Tensor] = None,
    ) -> Tensor:
        """Mean label-smoothed cross entropy of predicting `targets` (B, T), the tokens after `ids` (B, T);
        `counts` (B, T) bool: only those targets count (an instruction's response), the output layer running
        on them alone; `segments`: as in `forward`."""
        hidden = self.decoder(ids, segments=segments)
        if counts is None:
            return label_smoothed_loss(self.output(hidden).flatten(0, 1), targets.flatten(), label_smoothing)
        return label_smoothed_loss(self.output(hidden[counts]), targets[counts], label_smoothing)


class TransformerEncoder(nn.Module):
    """Encoder-only model (BERT's form): the encoder stack, then a sentence vector for classification or as a
    sentence embedding.

    A sentence vector is the first token's hidden state (`pooling: cls`) or the mean over its real tokens
    (`mean`). `classify` passes it through BERT's pooler (dense + tanh, if `pooler`) and dropout to
    `num_labels` logits; `embed` returns it as it is, L2-normalised if `normalize_embeddings`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.check_vocab()
        self.config = cfg
        self.encoder = Encoder(cfg, _token_embedding(cfg, cfg.src_vocab_size))
        self.pooler = Linear(cfg.d_model, cfg.d_model) if cfg.pooler else None
        self.dropout = Dropout(cfg.dropout)
        self.classifier = Linear(cfg.d_model, cfg.num_labels) if cfg.num_labels else None
        _init_linears(self)

    def forward(self, ids: Tensor, token_types: Optional[Tensor] = None, attn_maps: Optional[list] = None) -> Tensor:
        """(B, S) ids, right-padded with pad_id (and their token types) -> hidden states (B, S, E)."""
        return self.encoder(ids, padding_mask(ids, self.config.pad_id), attn_maps, token_types)

    def sentence_vectors(self, ids: Tensor, token_types: Optional[Tensor] = None) -> Tensor:
        """(B, S) ids -> (B, E): the first token's hidden state, or the mean over the real (non-pad) tokens."""
        hidden = self(ids, token_types)
        if self.config.pooling == "cls":
            return hidden[:, 0]
        real = (ids != self.config.pad_id).unsqueeze(-1).to(hidden.dtype)  # (B, S, 1)
        return (hidden * real).sum(1) / real.sum(1).clamp(min=1e-9)

    def embed(self, ids: Tensor, token_types: Optional[Tensor] = None) -> Tensor:
        """(B, S) ids -> (B, E) sentence embeddings (unit length if `normalize_embeddings`)."""
        vectors = self.sentence_vectors(ids, token_types)
        return F.normalize(vectors, p=2, dim=-1) if self.config.normalize_embeddings else vectors

    def classify(self, ids: Tensor, token_types: Optional[Tensor] = None) -> Tensor:
        """(B, S) ids -> (B, num_labels) class logits."""
        if self.classifier is None:
            raise TransformerError("this model has no classification head (model.num_labels is 0)")
        x = self.sentence_vectors(ids, token_types)
        if self.pooler is not None:
            x = torch.tanh(self.pooler(x))
        return self.classifier(self.dropout(x))

    def loss(
        self, ids: Tensor, labels: Tensor, label_smoothing: float = 0.0, token_types: Optional[Tensor] = None
    ) -> Tensor:
        """Mean cross entropy of the (B,) labels."""
        return label_smoothed_loss(self.classify(ids, token_types), labels, label_smoothing)


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model that `cfg.arch` names (with low-rank adapters on its projections if `cfg.lora`)."""
    model = {"decoder-only": TransformerLM, "encoder-only": TransformerEncoder}.get(cfg.arch, Transformer)(cfg)
    if cfg.lora is not None:
        from .lora import apply_lora

        apply_lora(model, cfg.lora)
    return model


def count_parameters(model: nn.Module) -> int:
    """Parameters of `model`, tied ones counted once."""
    return sum(p.numel() for p in model.parameters())
