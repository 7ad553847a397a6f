"""Corpora larger than memory: preparation speed, cache size, start-up time and memory as the corpus grows.

    python -m bench.data_scale [--sizes 1000000,5000000] [--work /tmp/scale] [--json bench/data_scale.json]

Builds corpora of the given numbers of sentence pairs from Multi30k (pairs drawn with replacement, lightly
perturbed: a word dropped or two neighbours swapped, on each side at random), writes them to disk, prepares each
(`transformer prepare`: wall time, lines/s, bytes of the cache), then trains 200 steps of the Multi30k recipe on
each prepared corpus in a fresh process, reporting the time from launch to the first step, the peak RSS and the
training tokens/s. Multi30k itself (29k pairs) is the first row.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "multi30k"
RECIPE = ROOT / "configs" / "multi30k-en-de.yaml"


def perturb(words: list[str], rng: random.Random) -> list[str]:
    if len(words) > 3 and rng.random() < 0.3:
        del words[rng.randrange(len(words))]
    if len(words) > 2 and rng.random() < 0.3:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    return words


def build(n: int, out: Path, seed: int = 0) -> tuple[Path, Path]:
    src = (DATA / "train.en").read_text(encoding="utf-8").splitlines()
    tgt = (DATA / "train.de").read_text(encoding="utf-8").splitlines()
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    fs, ft = out / f"train{n}.en", out / f"train{n}.de"
    if fs.exists() and ft.exists():
        return fs, ft
    with open(fs, "w", encoding="utf-8") as a, open(ft, "w", encoding="utf-8") as b:
        for _ in range(n):
            i = rng.randrange(len(src))
            a.write(" ".join(perturb(src[i].split(), rng)) + "\n")
            b.write(" ".join(perturb(tgt[i].split(), rng)) + "\n")
    return fs, ft


def sets(src: Path, tgt: Path, cache: Path) -> list[str]:
    return [
        f"data.train_src={src}",
        f"data.train_tgt={tgt}",
        f"data.val_src={DATA / 'val.en'}",
        f"data.val_tgt={DATA / 'val.de'}",
        f"data.cache_dir={cache}",
    ]


def prepare(src: Path, tgt: Path, cache: Path) -> dict:
    args = [arg for s in sets(src, tgt, cache) for arg in ("--set", s)]
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "transformer", "prepare", str(RECIPE), *args, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - start
    meta = json.loads(out.stdout)
    return {
        "prepare_s": round(seconds, 1),
        "lines_per_s": round(meta["lines"] / seconds),
        "cache_mb": round(meta["bytes"] / 1e6, 1),
        "pairs": meta["kept"],
    }


def train(src: Path, tgt: Path, cache: Path, steps: int = 200) -> dict:
    launched = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "bench.data_scale", "probe", str(src), str(tgt), str(cache), str(steps)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "first_step_s": round(probe["first_step_at"] - launched, 1),
        "peak_rss_mib": round(probe["peak_rss_mib"]),
        "tokens_per_s": round(probe["tokens_per_s"]),
    }


def probe(src: str, tgt: str, cache: str, steps: int) -> None:
    """Runs in its own process: a training run of `steps` steps; prints when step 1 ended, peak RSS, tokens/s."""
    from transformer.config import load_run_config
    from transformer.train import Trainer

    run = load_run_config(
        RECIPE,
        sets(Path(src), Path(tgt), Path(cache))
        + [
            f"train.max_steps={steps}",
            "train.max_minutes=0",
            "train.eval_every=1000000",
            "train.average_last=0",
            "train.eval_bleu_sentences=20",
            "train.log_every=1",
        ],
    )
    seen: list[tuple[float, float]] = []
    trainer = Trainer(run, tempfile.mkdtemp(prefix="scale-run-"))
    trainer.progress = lambda info: seen.append((time.time(), info["tokens_per_s"]))
    trainer.train()
    print(
        json.dumps(
            {
                "first_step_at": seen[0][0],
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "tokens_per_s": statistics.median(r for _, r in seen[20:]),
            }
        )
    )


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "probe":
        probe(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.data_scale", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000000,5000000", help="corpus sizes (pairs) besides Multi30k's own")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "transformer-scale"))
    p.add_argument("--json", default="bench/data_scale.json")
    args = p.parse_args(argv)
    work = Path(args.work)
    rows = []
    corpora = [("29k (Multi30k)", DATA / "train.en", DATA / "train.de")]
    for n in (int(x) for x in args.sizes.split(",")):
        start = time.perf_counter()
        fs, ft = build(n, work / "corpora")
        print(f"# built {n} pairs in {time.perf_counter() - start:.0f} s", flush=True)
        corpora.append((f"{n:,}", fs, ft))
    for name, fs, ft in corpora:
        cache = work / "cache"
        row = {"corpus": name, **prepare(fs, ft, cache), **train(fs, ft, cache)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["peak_rss_mib"]
    for r in rows:
        r["rss_vs_29k"] = round(r["peak_rss_mib"] / base, 3)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
