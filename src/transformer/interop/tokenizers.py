"""Tokenizers of pretrained models, behind the package's tokenizer interface (`encode`, `encode_batch`,
`decode`, `token_text`, `save`, `vocab_size`):

- `PretrainedTokenizer`: a Hugging Face `tokenizer.json` (BERT's WordPiece, GPT-2's byte-level BPE) with its own
  special tokens, which it adds where its post-processor says (BERT's [CLS] ... [SEP]).
- `SentencePieceTokenizer`: Marian's: a SentencePiece model splits text into pieces and a vocabulary
  (`vocab.json`) maps pieces to ids; sources end with </s>.

Both are saved as one JSON file in a checkpoint (the SentencePiece model inline, base64): nothing unpickled.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import DataError
from ..files import write_text_atomic


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

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def token_text(self, id: int) -> str:
        return self.tok.id_to_token(id) or "<unk>"

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def save(self, path: Path) -> None:
        data = {"type": "pretrained", "add_special_tokens": self.add_special_tokens,
                "tokenizer": json.loads(self.tok.to_str())}
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

    def __init__(self, model: bytes, vocab: dict[str, int], append_eos: bool, eos: str = "</s>", unk: str = "<unk>",
                 pad: str = "<pad>") -> None:
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
        data = {"type": "sentencepiece", "append_eos": self.append_eos, "eos": eos, "unk": unk, "pad": pad,
                "model": base64.b64encode(self.model).decode("ascii"), "vocab": self.vocab}
        write_text_atomic(Path(path), json.dumps(data, ensure_ascii=False))

    @classmethod
    def from_saved(cls, data: dict, path: Path) -> "SentencePieceTokenizer":
        try:
            return cls(base64.b64decode(data["model"]), data["vocab"], bool(data["append_eos"]), data.get("eos", "</s>"),
                       data.get("unk", "<unk>"), data.get("pad", "<pad>"))
        except (KeyError, ValueError, RuntimeError) as e:
            raise DataError(f"{path}: invalid SentencePiece tokenizer file ({e})") from None
