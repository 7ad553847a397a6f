"""Export to CTranslate2: the engine, given our exported weights, decodes what we decode and scores what we
score (fp32: per-token log-probabilities within 1e-4, two engines summing in different orders)."""

import pytest
import torch

ctranslate2 = pytest.importorskip(
    "ctranslate2", reason="CTranslate2 is in the bench and dev extras: pip install ctranslate2"
)

from helpers import REVERSE_WORDS as WORDS  # noqa: E402
from transformer import CheckpointError  # noqa: E402
from transformer.batching import pad_batch  # noqa: E402
from transformer.checkpoint import load_checkpoint  # noqa: E402
from transformer.generate import beam_search, greedy  # noqa: E402
from transformer.interop.ctranslate2 import export_ct2  # noqa: E402


@pytest.fixture(scope="module")
def exported(reverse_checkpoint, tmp_path_factory):
    ckpt = load_checkpoint(reverse_checkpoint)
    out = export_ct2(ckpt, tmp_path_factory.mktemp("ct2") / "model")
    return ckpt, ctranslate2.Translator(str(out), device="cpu", intra_threads=1)


def test_ctranslate2_decodes_our_export_as_we_do(exported):
    ckpt, translator = exported
    tok = ckpt.src_tokenizer
    src = pad_batch([tok.encode(w) for w in WORDS])
    pieces = [[tok.token_text(i) for i in tok.encode(w)] for w in WORDS]
    for beam in (1, 4):
        ours = greedy(ckpt.model, src) if beam == 1 else beam_search(ckpt.model, src, beam)
        theirs = translator.translate_batch(pieces, beam_size=beam, max_decoding_length=int(1.5 * 8 + 10))
        same = [[tok.token_text(i) for i in o] == r.hypotheses[0] for o, r in zip(ours, theirs)]
        # two engines summing in different orders may break a near-tie differently ("mmmm" or "mmm" when the
        # model hesitates); the scores themselves agree within 1e-4 (below)
        assert sum(same) >= len(WORDS) - 1, same


def test_ctranslate2_scores_references_as_we_do(exported):
    ckpt, translator = exported
    tok, model = ckpt.src_tokenizer, ckpt.model
    refs = [w[::-1] + "x" for w in WORDS]  # not the model's own output: every token's probability matters
    scored = translator.score_batch(
        [[tok.token_text(i) for i in tok.encode(w)] for w in WORDS],
        [[tok.token_text(i) for i in tok.encode(r)] for r in refs],
    )
    with torch.no_grad():
        for w, r, s in zip(WORDS, refs, scored):
            src, tgt = torch.tensor([tok.encode(w)]), tok.encode(r)
            logp = model(src, torch.tensor([[1, *tgt]])).log_softmax(-1)[0]
            ours = [float(logp[i, t]) for i, t in enumerate([*tgt, 2])]  # each token, then </s>
            assert s.log_probs == pytest.approx(ours, abs=1e-4)


def test_what_ctranslate2_cannot_represent_is_refused(tmp_path):
    from helpers import tiny_model
    from transformer.checkpoint import Checkpoint
    from transformer.tokenizers import CharTokenizer

    model = tiny_model("decoder-only", seed=None, vocab=10)
    tok = CharTokenizer("abc")
    with pytest.raises(
        CheckpointError, match="CTranslate2's Transformer cannot represent this model: arch='decoder-only'"
    ):
        export_ct2(Checkpoint(model, model.config, "lm", {"tgt": tok}), tmp_path / "out")


def test_export_command_with_int8(reverse_checkpoint, tmp_path, capsys):
    from transformer.cli import main

    assert (
        main(["export", str(reverse_checkpoint), "--to", "ct2", str(tmp_path / "int8"), "--quantization", "int8"]) == 0
    )
    assert "CTranslate2 model directory" in capsys.readouterr().out
    ckpt = load_checkpoint(reverse_checkpoint)
    tok = ckpt.src_tokenizer
    translator = ctranslate2.Translator(str(tmp_path / "int8"), compute_type="int8", intra_threads=1)
    out = translator.translate_batch([[tok.token_text(i) for i in tok.encode(w)] for w in WORDS])
    assert sum("".join(r.hypotheses[0]) == w[::-1] for r, w in zip(out, WORDS)) >= len(WORDS) - 2
