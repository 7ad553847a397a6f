"""python -m bench.instruct_eval [RECIPE] [CKPT ...]: exact match of greedy answers to the held-out built-in
instructions of a causal-lm recipe without JSONL files (configs/shakespeare-llama-instruct.yaml), for each
checkpoint: the base model and the tuned one. Each answer is decoded greedily after "TASK: <letters>\\n" until an
end token; it matches when it is exactly the task's answer.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from transformer.checkpoint import load_checkpoint
from transformer.config import load_run_config
from transformer.data import SyntheticTask
from transformer.generate import sample


def exact_match(ckpt_dir: str, pairs: list[tuple[str, str]], task: str) -> float:
    ckpt = load_checkpoint(ckpt_dir)
    tok, ends = ckpt.tgt_tokenizer, set(ckpt.config.eos_ids)
    right = 0
    for question, answer in pairs:
        written = []
        for token in sample(ckpt.model, torch.tensor([tok.encode(f"{task}: {question}\n")]), len(answer) + 1, 0.0):
            if int(token[0]) in ends:
                break
            written.append(int(token[0]))
        right += tok.decode(written) == answer
    return right / len(pairs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.instruct_eval", description=__doc__.splitlines()[0])
    p.add_argument("recipe", nargs="?", default="configs/shakespeare-llama-instruct.yaml")
    p.add_argument(
        "checkpoints", nargs="*", default=["runs/shakespeare-llama/best", "runs/shakespeare-llama-instruct/best"]
    )
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    run = load_run_config(args.recipe)
    d = run.data
    task = SyntheticTask(d.synthetic_task, d.synthetic_min_len, d.synthetic_max_len)
    _, held_out = task.split(d.synthetic_train_size, d.synthetic_val_size, seed=run.train.seed)
    for ckpt in args.checkpoints:
        print(f"{ckpt}: exact match {exact_match(ckpt, held_out, d.synthetic_task):.3f} on {len(held_out)} held-out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
