"""Decoding speed on a GPU, fp32 against bf16 autocast: python bench/gpu_decode.py (needs CUDA).

A Multi30k-sized model (d 256, 3+3 layers, 8000 tokens) with random weights decodes 512 random sources of 8-30
tokens in batches of 64, beam 5 and greedy, each precision timed after a warm-up on the same batches.
"""

import copy
import time

import torch

from transformer import ModelConfig, Transformer
from transformer.generate import beam_search, greedy


def sources(device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(8):
        lens = torch.randint(8, 30, (64,), generator=g)
        s = torch.zeros(64, int(lens.max()), dtype=torch.long)
        for i, n in enumerate(lens.tolist()):
            s[i, :n] = torch.randint(4, 8000, (n,), generator=g)
        out.append(s.to(device))
    return out


def main() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(src_vocab_size=8000, tgt_vocab_size=8000, d_model=256, n_heads=4,
                                    n_encoder_layers=3, n_decoder_layers=3, d_ff=1024, norm_first=True,
                                    tie_embeddings="all")).to(device).eval()
    srcs = sources(device)
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)  # what `--bf16` decodes with on a GPU
    for name, decode in (("beam 5", lambda m, s: beam_search(m, s, 5)), ("greedy", lambda m, s: greedy(m, s))):
        for label, m, autocast in (("fp32", model, False), ("bf16 autocast", model, True),
                                   ("bf16 weights (--bf16)", bf16_model, False)):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                for s in srcs:  # warm-up: every shape once
                    decode(m, s)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for s in srcs:
                    decode(m, s)
                torch.cuda.synchronize()
            print(f"{name:7s} {label:22s}: {time.perf_counter() - start:6.2f} s for 512 sentences", flush=True)


if __name__ == "__main__":
    main()
