import pytest

from transformer.batching import collate, pair_lengths, token_batches
from transformer.data import SyntheticTask, read_labelled, read_lines, read_parallel
from transformer.errors import DataError
from transformer.tokenizers import BOS, EOS, PAD, UNK, BPETokenizer, CharTokenizer, load_tokenizer

SENTENCES = [
    "Two young, White males are outside near many bushes.",
    "Ein kleines Mädchen klettert in ein Spielhaus aus Holz.",
    "A man in a blue shirt is standing on a ladder cleaning windows.",
    "Zwei Männer stehen am Herd und bereiten Essen zu.",
] * 20


def test_char_tokenizer_round_trip_and_unknowns(tmp_path):
    tok = CharTokenizer.train(["hello world"])
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.encode("z")[0] == UNK
    tok.save(tmp_path / "t.json")
    again = load_tokenizer(tmp_path / "t.json")
    assert again.encode("hold") == tok.encode("hold")


def test_bpe_round_trip(tmp_path):
    tok = BPETokenizer.train(SENTENCES, vocab_size=300)
    for s in SENTENCES[:4]:
        ids = tok.encode(s)
        assert min(ids) >= 4  # specials are never produced by encoding text
        assert tok.decode(ids) == s
    tok.save(tmp_path / "bpe.json")
    again = load_tokenizer(tmp_path / "bpe.json")
    assert again.encode(SENTENCES[1]) == tok.encode(SENTENCES[1])
    assert again.decode([BOS, *tok.encode("Zwei Männer"), EOS, PAD]) == "Zwei Männer"


def test_bpe_round_trip_on_multi30k(shared_data):
    en = read_lines(shared_data / "multi30k" / "val.en")
    de = read_lines(shared_data / "multi30k" / "val.de")
    tok = BPETokenizer.train(en + de, vocab_size=2000)
    bad = [s for s in en + de if tok.decode(tok.encode(s)) != " ".join(s.split())]
    assert not bad, bad[:3]


def test_read_lines_errors(tmp_path):
    with pytest.raises(DataError, match="missing.txt: data file not found"):
        read_lines(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="empty.txt: data file is empty"):
        read_lines(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_bytes(b"fine\nalso fine\nbad \xff here\n")
    with pytest.raises(DataError, match=r"bad.txt:3: invalid UTF-8"):
        read_lines(tmp_path / "bad.txt")
    (tmp_path / "crlf.txt").write_bytes(b"a b\r\nc\xc2\xa0\r\n")
    assert read_lines(tmp_path / "crlf.txt") == ["a b", "c"]


def test_read_parallel(tmp_path):
    (tmp_path / "a").write_text("1\n2\n3\n")
    (tmp_path / "b").write_text("x\ny\n")
    with pytest.raises(DataError, match="3 lines but .* has 2"):
        read_parallel(str(tmp_path / "a"), str(tmp_path / "b"), None, "train")
    (tmp_path / "p.tsv").write_text("hello\thallo\nbye\ttschüss\n")
    assert read_parallel(None, None, str(tmp_path / "p.tsv"), "train") == (["hello", "bye"], ["hallo", "tschüss"])
    (tmp_path / "bad.tsv").write_text("hello\thallo\nno tab here\n")
    with pytest.raises(DataError, match="bad.tsv:2: expected 'source<TAB>target'"):
        read_parallel(None, None, str(tmp_path / "bad.tsv"), "train")


def test_token_batches_cover_everything_within_budget():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(1000)]
    batches = token_batches(lengths, max_tokens=400, seed=3, epoch=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    assert all(max(lengths[i] for i in b) * len(b) <= 400 for b in batches)
    assert batches == token_batches(lengths, max_tokens=400, seed=3, epoch=0)  # deterministic
    assert batches != token_batches(lengths, max_tokens=400, seed=3, epoch=1)  # reshuffled each epoch
    # bucketing keeps padding small compared with random batches of the same size
    pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert pad / sum(lengths) < 0.1
    assert all(len(b) <= 7 for b in token_batches(lengths, max_tokens=4000, max_sentences=7))


def test_collate_shifts_target():
    b = collate([([5, 6, 7], [8, 9]), ([5], [8, 9, 10])])
    assert b.src.tolist() == [[5, 6, 7], [5, PAD, PAD]]
    assert b.tgt_in.tolist() == [[BOS, 8, 9, PAD], [BOS, 8, 9, 10]]
    assert b.tgt_out.tolist() == [[8, 9, EOS, PAD], [8, 9, 10, EOS]]
    assert b.n_tokens == 7
    assert pair_lengths([([5, 6, 7], [8, 9])]) == [3]


@pytest.mark.parametrize("name", SyntheticTask.TASKS)
def test_synthetic_task_is_deterministic_and_held_out_is_unseen(name):
    task = SyntheticTask(name, 1, 10)
    train, val = task.split(2000, 200, seed=5)
    assert (train, val) == task.split(2000, 200, seed=5)
    assert not {s for s, _ in val} & {s for s, _ in train}
    assert len({len(s) for s, _ in train}) == 10  # variable lengths
    for s, t in val:
        assert t == {"reverse": s[::-1], "sort": "".join(sorted(s)), "copy": s}[name]


def test_lines_end_at_newline_only(tmp_path):
    """Bug: str.splitlines() also splits at U+2028 (and U+0085, form feeds, ...), which silently shifted one
    side of a line-aligned pair of files against the other."""
    (tmp_path / "src.txt").write_text("one\u2028uno\ntwo\n", encoding="utf-8")
    (tmp_path / "tgt.txt").write_text("eins\nzwei\u2028zwo\n", encoding="utf-8")
    src, tgt = read_parallel(str(tmp_path / "src.txt"), str(tmp_path / "tgt.txt"), None, "train")
    assert list(zip(src, tgt)) == [("one\u2028uno", "eins"), ("two", "zwei\u2028zwo")]
    # as `wc -l` counts: the final newline starts no line, a missing one loses none, blank lines stay
    for text, lines in [
        ("a\nb\n", ["a", "b"]),
        ("a\nb", ["a", "b"]),
        ("a\n\nb\r\n", ["a", "", "b"]),
        ("x\x0cy\x1cz\x85w\n", ["x\x0cy\x1cz\x85w"]),
    ]:
        (tmp_path / "f.txt").write_text(text, encoding="utf-8", newline="")
        assert read_lines(tmp_path / "f.txt") == lines


def test_collate_pads_with_the_models_pad_id():
    # pad_id 3: the real token 0 is a target like any other, and counted
    b = collate([([5, 0], [0, 9]), ([5], [8, 9, 10])], pad_id=3)
    assert b.src.tolist() == [[5, 0], [5, 3]]
    assert b.tgt_out.tolist() == [[0, 9, EOS, 3], [8, 9, 10, EOS]]
    assert b.n_tokens == 7


def test_language_model_windows_reach_the_end_of_the_text():
    """Bug: the last window of the text was never drawn, and a text one token longer than a block failed."""
    import torch

    from transformer.batching import lm_blocks

    data = torch.arange(10)
    b = lm_blocks(data, 9, 4, torch.Generator().manual_seed(0))  # exactly one window fits
    assert b.x.tolist() == [list(range(9))] * 4 and b.y.tolist() == [list(range(1, 10))] * 4 and b.n_tokens == 36
    starts = {int(x[0]) for x in lm_blocks(torch.arange(12), 8, 400, torch.Generator().manual_seed(0)).x}
    assert starts == {0, 1, 2, 3}  # 3: the window ending at the last token


def test_a_first_line_with_a_label_of_its_own_is_data_not_a_header(tmp_path):
    """Bug: a first line whose label no other line had was taken for a header and dropped, with it the only
    example of its class, even when the known labels said it was one."""
    (tmp_path / "t.tsv").write_text("neutral\tso so\npos\tgreat\nneg\tawful\npos\tfine\n")
    assert read_labelled(tmp_path / "t.tsv", "training file") == (
        ["neutral", "pos", "neg", "pos"],
        ["so so", "great", "awful", "fine"],
    )
    known = ["neg", "neutral", "pos"]
    assert read_labelled(tmp_path / "t.tsv", "validation file", known=known)[0] == ["neutral", "pos", "neg", "pos"]
    (tmp_path / "one.tsv").write_text("1\tthe only line\n")
    assert read_labelled(tmp_path / "one.tsv", "training file") == (["1"], ["the only line"])
    # a first label that is no known one and no column name is a bad line, not a header silently dropped
    (tmp_path / "bad.tsv").write_text("maybe\ta cat\npos\ta dog\n")
    with pytest.raises(DataError, match=r"bad.tsv:1: label 'maybe' is not one of the training labels"):
        read_labelled(tmp_path / "bad.tsv", "validation file", known=["neg", "pos"])


@pytest.mark.parametrize("header", ["label\tsentence", "Label\tcontent", "sentiment\ttext", "polarity\treview"])
def test_a_header_line_is_still_skipped(tmp_path, header):
    (tmp_path / "t.tsv").write_text(f"{header}\n0\tdull\n1\tbright\n1\tsunny\n")
    for known in (None, ["0", "1"]):
        assert read_labelled(tmp_path / "t.tsv", "training file", known=known) == (
            ["0", "1", "1"],
            ["dull", "bright", "sunny"],
        )
    # over word labels, the column name is the text field's
    (tmp_path / "w.tsv").write_text(f"{header.split()[0]}\tsentence\nneg\tdull\npos\tbright\n")
    assert read_labelled(tmp_path / "w.tsv", "training file") == (["neg", "pos"], ["dull", "bright"])


def test_sst2_headers_are_skipped_and_every_line_kept(shared_data):
    path = shared_data / "sst2" / "dev.tsv"
    labels, texts = read_labelled(path, "validation file", known=["0", "1"])
    lines = [l for l in path.read_text(encoding="utf-8").split("\n")[1:] if l.strip()]
    assert len(labels) == len(lines) and set(labels) == {"0", "1"} and texts[0] == lines[0].split("\t", 1)[1]
