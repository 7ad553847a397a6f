"""Pictures: training curves from metrics.jsonl, and attention heat maps (matplotlib: `transformer[viz]`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .errors import TransformerError
from .files import atomic_path, write_text_atomic
from .templates import template


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The validation records of a run (`RUN_DIR/metrics.jsonl` or the file itself), checked line by line."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TransformerError(f"{path}: not found (a run directory has one after its first validation)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TransformerError(f"{path}: unreadable ({e})") from None
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise TransformerError(f"{path}:{i}: not a JSON line ({e.msg})") from None
        if not isinstance(rec, dict) or "step" not in rec:
            raise TransformerError(f"{path}:{i}: expected a JSON object with a 'step'")
        records.append(rec)
    if not records:
        raise TransformerError(f"{path}: no records")
    return records


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TransformerError("plotting needs matplotlib: pip install 'transformer[viz]'") from None
    return plt


def plot_curves(run_dir: str | Path, out: str | Path, title: str | None = None) -> Path:
    """Losses against steps, the validation score against wall-clock minutes, learning rate against steps."""
    records = read_metrics(run_dir)
    plt = _pyplot()
    steps = [r["step"] for r in records]
    minutes = [r.get("minutes", 0.0) for r in records]
    score_key = next((k for k in ("bleu", "exact_match") if k in records[-1]), "val_loss")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    for key, label in (("train_loss", "training (label-smoothed)"), ("val_loss", "validation")):
        pts = [(s, r[key]) for s, r in zip(steps, records) if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=label)
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    ax = axes[1]
    pts = [(m, r[score_key]) for m, r in zip(minutes, records) if score_key in r]
    ax.plot(*zip(*pts), marker="o", ms=3, color="tab:green")
    label = {"bleu": "validation BLEU", "exact_match": "validation exact match"}.get(score_key, "validation loss")
    ax.set(xlabel="wall-clock minutes", ylabel=label, title=f"{label} over time")
    ax = axes[2]
    pts = [(s, r["lr"]) for s, r in zip(steps, records) if "lr" in r]
    if pts:
        ax.plot(*zip(*pts), marker="o", ms=3, color="tab:red")
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    if title:
        fig.suptitle(title)
    return _save_figure(plt, fig, out, dpi=100)


def _save_figure(plt, fig, out: str | Path, dpi: int) -> Path:
    """Write a PNG atomically (a temporary file renamed into place), then free the figure."""
    fig.tight_layout()
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return Path(out)


# ----------------------------------------------------------------------------------------------------------
# Attention maps


@dataclass
class AttentionMaps:
    """Attention weights of one sentence pair, from the model's own six-step attention.

    encoder: (L, H, S, S) source positions attending to source positions; decoder: (L, H, T, T) decoder
    inputs (<s> + target) attending to earlier ones; cross: (L, H, T, S) decoder inputs attending to the source.
    Each row sums to 1 (over the keys a query may see).
    """

    src_tokens: list[str]
    tgt_tokens: list[str]
    encoder: torch.Tensor
    decoder: torch.Tensor
    cross: torch.Tensor

    def kinds(self) -> dict[str, tuple[torch.Tensor, list[str], list[str]]]:
        """kind -> (weights, query labels, key labels)."""
        return {
            "encoder": (self.encoder, self.src_tokens, self.src_tokens),
            "decoder": (self.decoder, self.tgt_tokens, self.tgt_tokens),
            "cross": (self.cross, self.tgt_tokens, self.src_tokens),
        }


@torch.no_grad()
def attention_maps(model, src_tok, tgt_tok, source: str, target: Optional[str] = None) -> AttentionMaps:
    """Run `source` (and `target`, or the model's own greedy translation) through the model, teacher-forced,
    collecting every layer's attention weights."""
    from .generate import greedy

    if not source.strip():
        raise TransformerError("the source sentence is empty; give some text to look at")
    model.eval()
    device = next(model.parameters()).device
    src_ids = src_tok.encode(source)
    src = torch.tensor([src_ids], device=device)
    if target is None:
        tgt_ids = greedy(model, src)[0]
    else:
        tgt_ids = tgt_tok.encode(target)
    tgt_in = torch.tensor([[model.config.bos_id, *tgt_ids]], device=device)
    enc_w: list = []
    dec_w: list = []
    with torch.no_grad():
        memory, mask = model.encode(src, attn_maps=enc_w)
        model.decode(tgt_in, memory, mask, attn_maps=dec_w)

    def stack(records: list, kind: str) -> torch.Tensor:  # (layers, heads, T, S) on the CPU
        return torch.stack([w[kind][0] for w in records]).float().cpu()

    return AttentionMaps(
        src_tokens=[src_tok.token_text(i) for i in src_ids],
        tgt_tokens=[tgt_tok.token_text(i) for i in tgt_in[0].tolist()],
        encoder=stack(enc_w, "self"),
        decoder=stack(dec_w, "self"),
        cross=stack(dec_w, "cross"),
    )


def plot_attention(
    maps: AttentionMaps,
    out: str | Path,
    kinds: Sequence[str] = ("encoder", "decoder", "cross"),
    layer: Optional[int] = None,
    head: Optional[int] = None,
) -> Path:
    """Heat maps with tokens on both axes: a grid of layers x heads for each kind, or one large map when
    `layer` and `head` are given (1-based)."""
    plt = _pyplot()
    L, H = maps.encoder.shape[:2]
    for name, value, limit in (("layer", layer, maps.decoder.shape[0]), ("head", head, H)):
        if value is not None and not 1 <= value <= limit:
            raise TransformerError(f"--{name} {value}: the model has {name}s 1..{limit}")
    single = layer is not None or head is not None
    layers = [layer - 1] if layer else None
    heads = [head - 1] if head else list(range(H))
    panels = []
    for kind in kinds:
        weights, rows, cols = maps.kinds()[kind]
        for l in layers if layers is not None else range(weights.shape[0]):
            for h in heads:
                panels.append((kind, l, h, weights[l, h], rows, cols))
    ncols = len(heads)
    nrows = -(-len(panels) // ncols)
    size = 6.0 if single and len(panels) == 1 else 2.6
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols + 0.5, size * nrows + 0.5), squeeze=False)
    label_size = 9 if size > 3 else 5
    for ax, (kind, l, h, w, rows, cols) in zip(axes.flat, panels):
        ax.imshow(w.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(f"{kind} L{l + 1} H{h + 1}", fontsize=label_size + 1)
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=label_size)
        ax.set_yticks(range(len(rows)), rows, fontsize=label_size)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    return _save_figure(plt, fig, out, dpi=110)


def attention_html(maps: AttentionMaps, out: str | Path) -> Path:
    """One self-contained page (no network requests) to pick kind, layer and head, and hover tokens."""
    write_text_atomic(out, attention_page(maps))
    return Path(out)


def _bytes_b64(weights: torch.Tensor) -> str:
    """A (rows, cols) map of weights in [0, 1] as one byte per weight (w x 255, rounded), base64: 1.33 bytes a
    weight in the page, where a list of rounded floats took about eight (and a Python object each to build)."""
    import base64

    q = (weights.float().clamp(0, 1) * 255).round().to(torch.uint8).contiguous().numpy()
    return base64.b64encode(q.tobytes()).decode("ascii")


def attention_page(maps: AttentionMaps) -> str:
    """The explorer page of `attention_html`, as a string (the server shows it in its own page)."""
    titles = {"encoder": "encoder self-attention", "decoder": "decoder self-attention", "cross": "cross-attention"}
    data = {"kinds": {}}
    for kind, (weights, rows, cols) in maps.kinds().items():
        data["kinds"][kind] = {
            "title": titles[kind],
            "queries": rows,
            "keys": cols,
            "weights": [[_bytes_b64(head) for head in layer] for layer in weights],
        }
    # JSON inside <script>: escape "</" so a token can never close the script element
    return template("attention.html").replace("__DATA__", json.dumps(data, ensure_ascii=False).replace("</", "<\\/"))
