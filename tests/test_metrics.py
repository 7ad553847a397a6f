"""transformer.evaluate: the scores are sacreBLEU's own, as its command line gives them."""

import json
import subprocess
import sys

from transformer.metrics import bleu_chrf, bleu_score, exact_match

HYPS = ["the cat sat on a mat", "hello there world", "Ein Hund läuft im Schnee.", ""]
REFS = ["the cat sat on the mat", "hello world", "Ein Hund rennt durch den Schnee.", "nothing"]


def test_bleu_and_chrf_equal_the_sacrebleu_command_line(tmp_path):
    (tmp_path / "hyp.txt").write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("\n".join(REFS) + "\n", encoding="utf-8")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sacrebleu",
            str(tmp_path / "ref.txt"),
            "-i",
            str(tmp_path / "hyp.txt"),
            "-m",
            "bleu",
            "chrf",
            "-b",
            "-w",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    bleu, chrf = json.loads(proc.stdout)
    scores = bleu_chrf(HYPS, REFS)
    assert round(scores.bleu, 4) == bleu and round(scores.chrf, 4) == chrf
    assert round(bleu_score(HYPS, REFS), 4) == bleu
    assert scores.bleu_signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")


def test_exact_match():
    assert exact_match(["a", "b", "c"], ["a", "x", "c"]) == 2 / 3
    assert exact_match([], []) == 0.0
