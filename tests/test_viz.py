import pytest
import torch

from helpers import CHROMIUM_FLAGS, chromium_or_skip
from transformer import TransformerError
from transformer.checkpoint import load_checkpoint
from transformer.cli import main
from transformer.viz import attention_maps, plot_attention, plot_curves, read_metrics

pytest.importorskip("matplotlib")


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def not_blank(path):
    import matplotlib.image

    img = matplotlib.image.imread(str(path))
    return float(img[..., :3].std()) > 0.05


def test_training_curves(reverse_run, tmp_path):
    out = plot_curves(reverse_run[0], tmp_path / "curves.png")
    w, h = png_size(out)
    assert w > 800 and h > 250 and not_blank(out)


def test_bad_metrics_files(tmp_path):
    with pytest.raises(TransformerError, match="metrics.jsonl: not found"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "val_loss": 2.0}\n{"step": 2, "val_lo\n')
    with pytest.raises(TransformerError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(tmp_path)


def test_attention_maps_are_distributions(reverse_checkpoint, tmp_path):
    ckpt = load_checkpoint(reverse_checkpoint)
    maps = attention_maps(ckpt.model, ckpt.src_tokenizer, ckpt.tgt_tokenizer, "abcde")
    assert maps.src_tokens == list("abcde") and maps.tgt_tokens == ["<s>", *"edcba"]
    L, H = len(ckpt.model.encoder.layers), ckpt.config.n_heads
    assert (
        maps.encoder.shape == (L, H, 5, 5) and maps.cross.shape == (L, H, 6, 5) and maps.decoder.shape == (L, H, 6, 6)
    )
    for w in (maps.encoder, maps.decoder, maps.cross):
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    assert torch.all(maps.decoder.triu(1) == 0)  # nothing attends to the future
    grid = plot_attention(maps, tmp_path / "grid.png")
    one = plot_attention(maps, tmp_path / "one.png", kinds=["cross"], layer=2, head=1)
    assert png_size(grid)[1] > png_size(one)[1] > 300 and not_blank(grid) and not_blank(one)


def test_attention_command_errors(reverse_checkpoint, tmp_path, capsys):
    assert main(["attention", str(reverse_checkpoint), "   ", "--out", str(tmp_path / "a.png")]) == 2
    assert "source sentence is empty" in capsys.readouterr().err
    assert main(["attention", str(reverse_checkpoint), "abc", "--layer", "9", "--out", str(tmp_path / "a.png")]) == 2
    assert "--layer 9: the model has layers 1..2" in capsys.readouterr().err
    assert main(["attention", str(reverse_checkpoint), "abc", "--target", "cba", "--out", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").is_file()


def test_attention_page_in_a_real_browser(reverse_checkpoint, tmp_path):
    """The explorer page in headless Chromium: loads from file:// with no console errors and no network
    requests; choosing another head redraws; hovering a token highlights where it attends."""
    sync_api, chromium = chromium_or_skip()
    assert main(["attention", str(reverse_checkpoint), "abcdef", "--html", str(tmp_path / "a.html")]) == 0
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        errors, requests = [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto((tmp_path / "a.html").as_uri())
        cells = page.locator("#grid td")
        assert cells.count() == 7 * 6  # cross-attention: <s> + 6 target tokens x 6 source tokens
        colours = lambda: [cells.nth(i).evaluate("e => e.style.background") for i in range(cells.count())]
        first = colours()
        page.select_option("#head", "2")
        assert colours() != first
        page.select_option("#kind", "encoder")
        assert page.locator("#grid td").count() == 36
        page.hover("#grid th.row >> nth=2")
        assert page.locator("#grid th.row.hl").count() == 1
        assert page.locator("#grid td.hl").count() >= 1
        page.hover("#grid th.col >> nth=0")
        assert page.locator("#grid th.col.hl").count() == 1
        browser.close()
    assert not errors, errors
    assert all(u.startswith("file://") for u in requests), requests
