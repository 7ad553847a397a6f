"""Tokenizers: text <-> ids. The protocol every tokenizer follows, the ones this package trains (characters,
BPE, byte-level BPE, unigram), loading them back, and the tokenizers of pretrained models behind the same
protocol.

Every tokenizer this package trains reserves the same four ids: <pad>=0, <s>=1 (begin), </s>=2 (end), <unk>=3.
Pretrained models' tokenizers bring their own special tokens:

- `PretrainedTokenizer`: a Hugging Face `tokenizer.json` (BERT's WordPiece, GPT-2's byte-level BPE) with its own
  special tokens, which it adds where its post-processor says (BERT's [CLS] ... [SEP]).
- `SentencePieceTokenizer`: Marian's: a SentencePiece model splits text into pieces and a vocabulary
  (`vocab.json`) maps pieces to ids; sources end with </s>.

Every tokenizer is saved as one JSON file (a SentencePiece model inline, base64): nothing is unpickled.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Iterable, Protocol, Sequence

from .errors import DataError
from .files import read_json, write_text_atomic

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


# ----------------------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_text(self, id: int) -> str: ...

    def save(self, path: Path) -> None: ...


class CharTokenizer:
    """One token per character; characters not seen in training map to <unk>."""

    def __init__(self, chars: Sequence[str]) -> None:
        self.chars = list(chars)
        self.itos = SPECIALS + self.chars
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.vocab_size = len(self.itos)

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls(sorted(seen))

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(c, UNK) for c in text]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] for i in ids if i >= len(SPECIALS) and i < self.vocab_size)

    def token_text(self, id: int) -> str:
        return self.itos[id] if 0 <= id < self.vocab_size else "<unk>"

    def save(self, path: Path) -> None:
        write_text_atomic(Path(path), json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False))


class BPETokenizer:
    """Subword tokenizer (byte-pair encoding, Hugging Face `tokenizers`), trained on the training text.

    NFKC-normalised; spaces are kept as the "▁" marker, so decoding gives back plain detokenised text.
    """

    def __init__(self, tok) -> None:  # tok: tokenizers.Tokenizer
        self.tok = tok
        self.tok.encode_special_tokens = True  # the text "<s>" is four characters, never the begin token
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Strip()])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def train_unigram(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        """SentencePiece's unigram model: the vocabulary that maximises the likelihood of the text under a
        unigram language model of subwords, pruned from a large seed set (Kudo 2018)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

        tok = HFTokenizer(models.Unigram())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Strip()])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=SPECIALS, unk_token="<unk>", show_progress=False
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def train_bytes(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        """Byte-level BPE (as GPT-2): no normalisation and no unknown tokens, so any Unicode text, whitespace
        included, decodes back exactly."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIALS,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([i for i in ids if i >= len(SPECIALS)], skip_special_tokens=True)

    def token_text(self, id: int) -> str:
        return self.tok.id_to_token(id) or "<unk>"

    def save(self, path: Path) -> None:
        write_text_atomic(Path(path), self.tok.to_str())


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """ "char": one token per character; "bpe": subwords over NFKC-normalised words (spaces kept as "▁");
    "bytebpe": byte-level subwords, exact for any text; "sentencepiece": SentencePiece's unigram language-model
    subwords (as `tokenizers` implements them), spaces kept as "▁"."""
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bytebpe":
        return BPETokenizer.train_bytes(texts, vocab_size)
    if kind == "sentencepiece":
        return BPETokenizer.train_unigram(texts, vocab_size)
    return BPETokenizer.train(texts, vocab_size)


def load_tokenizer(path: Path) -> Tokenizer:
    """Read a tokenizer saved by `save` (JSON only: nothing is unpickled)."""
    path = Path(path)
    data = read_json(path, DataError, "tokenizer file not found", what=" tokenizer file")
    if isinstance(data, dict) and data.get("type") == "char":
        return CharTokenizer(data["chars"])
    if isinstance(data, dict) and data.get("type") in ("pretrained", "sentencepiece"):  # imported models'
        kind = PretrainedTokenizer if data["type"] == "pretrained" else SentencePieceTokenizer
        return kind.from_saved(data, path)
    if isinstance(data, dict) and "model" in data:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return BPETokenizer(HFTokenizer.from_str(json.dumps(data)))
        except Exception as e:  # the library's own parse errors
            raise DataError(f"{path}: invalid tokenizer file ({e})") from None
    raise DataError(f"{path}: not a tokenizer file this package wrote")


# ----------------------------------------------------------------------------------------------------------
# Pretrained models' tokenizers


class PretrainedTokenizer:
    """A `tokenizers.Tokenizer` as a pretrained model's authors saved it."""

    def __init__(self, tok, add_special_tokens: bool = True) -> None:
        tok.no_padding()  # batches are padded (and inputs truncated) by this package, to what the model needs
        tok.no_truncation()
        self.tok, self.add_special_tokens = tok, add_special_tokens
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: Path, add_special_tokens: bool = True) -> "PretrainedTokenizer":
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)), add_special_tokens)
        except Exception as e:  # the library's own parse errors
            raise DataError(f"{path}: not a tokenizer.json that `tokenizers` can read ({e})") from None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=self.add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=self.add_special_tokens)]

    def encode_plain(self, text: str) -> list[int]:
        """The ids of `text` alone, no special tokens added: for text that already holds them (a rendered chat
        template, as transformers tokenises it)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def token_text(self, id: int) -> str:
        return self.tok.id_to_token(id) or "<unk>"

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def save(self, path: Path) -> None:
        data = {
            "type": "pretrained",
            "add_special_tokens": self.add_special_tokens,
            "tokenizer": json.loads(self.tok.to_str()),
        }
        write_text_atomic(Path(path), json.dumps(data, ensure_ascii=False))

    @classmethod
    def from_saved(cls, data: dict, path: Path) -> "PretrainedTokenizer":
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_str(json.dumps(data["tokenizer"])), bool(data.get("add_special_tokens", True)))
        except Exception as e:
            raise DataError(f"{path}: invalid tokenizer file ({e})") from None


class SentencePieceTokenizer:
    """Marian's tokenizer: SentencePiece pieces looked up in `vocab` (piece -> id); unknown pieces are <unk>.
    `append_eos`: a source sentence ends with </s> (what Marian models were trained on)."""

    def __init__(
        self,
        model: bytes,
        vocab: dict[str, int],
        append_eos: bool,
        eos: str = "</s>",
        unk: str = "<unk>",
        pad: str = "<pad>",
    ) -> None:
        try:
            import sentencepiece
        except ImportError:
            raise DataError("Marian tokenizers need sentencepiece: pip install sentencepiece") from None
        self.model, self.vocab, self.append_eos = model, dict(vocab), append_eos
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=model)
        self.pieces = {i: p for p, i in self.vocab.items()}
        self.eos_id, self.unk_id = self.vocab[eos], self.vocab[unk]
        self.specials = {self.vocab[t] for t in (eos, unk, pad) if t in self.vocab}
        self.names = (eos, unk, pad)
        self.vocab_size = max(self.vocab.values()) + 1

    def encode(self, text: str) -> list[int]:
        ids = [self.vocab.get(p, self.unk_id) for p in self.sp.encode(text, out_type=str)]
        return ids + [self.eos_id] if self.append_eos else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode_pieces([self.pieces[i] for i in ids if i in self.pieces and i not in self.specials])

    def token_text(self, id: int) -> str:
        return self.pieces.get(id, self.names[1])

    def save(self, path: Path) -> None:
        eos, unk, pad = self.names
        data = {
            "type": "sentencepiece",
            "append_eos": self.append_eos,
            "eos": eos,
            "unk": unk,
            "pad": pad,
            "model": base64.b64encode(self.model).decode("ascii"),
            "vocab": self.vocab,
        }
        write_text_atomic(Path(path), json.dumps(data, ensure_ascii=False))

    @classmethod
    def from_saved(cls, data: dict, path: Path) -> "SentencePieceTokenizer":
        try:
            return cls(
                base64.b64decode(data["model"]),
                data["vocab"],
                bool(data["append_eos"]),
                data.get("eos", "</s>"),
                data.get("unk", "<unk>"),
                data.get("pad", "<pad>"),
            )
        except (KeyError, ValueError, RuntimeError) as e:
            raise DataError(f"{path}: invalid SentencePiece tokenizer file ({e})") from None
