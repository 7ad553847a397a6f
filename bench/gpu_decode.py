"""Decoding speed on a GPU, fp32 against bf16 autocast: python bench/gpu_decode.py (needs CUDA).

A Multi30k-sized model (d 256, 3+3 layers, 8000 tokens) with random weights decodes 512 random sources of 8-30
tokens in batches of 64, beam 5 and greedy, each precision timed after a warm-up on the same batches.
"""

import copy
import sys
import time
from pathlib import Path

import torch

from transformer import ModelConfig, Transformer
from transformer.generate import beam_search, greedy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/gpu_decode.py` finds bench


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
    model = (
        Transformer(
            ModelConfig(
                src_vocab_size=8000,
                tgt_vocab_size=8000,
                d_model=256,
                n_heads=4,
                n_encoder_layers=3,
                n_decoder_layers=3,
                d_ff=1024,
                norm_first=True,
                tie_embeddings="all",
            )
        )
        .to(device)
        .eval()
    )
    srcs = sources(device)
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)  # what `--bf16` decodes with on a GPU
    for name, decode in (("beam 5", lambda m, s: beam_search(m, s, 5)), ("greedy", lambda m, s: greedy(m, s))):
        for label, m, autocast in (
            ("fp32", model, False),
            ("bf16 autocast", model, True),
            ("bf16 weights (--bf16)", bf16_model, False),
        ):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                for s in srcs:  # warm-up: every shape once
                    decode(m, s)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for s in srcs:
                    decode(m, s)
                torch.cuda.synchronize()
            print(f"{name:7s} {label:22s}: {time.perf_counter() - start:6.2f} s for 512 sentences", flush=True)


def race_hf() -> None:
    """Ours against HF generate at the base size on the GPU (work checked equal by the harness)."""
    from bench import workloads as W
    from bench.harness import compare, ratio

    if not W.have_hf():
        print("HF race skipped: transformers is not installed")
        return
    for beam, batch in ((1, 32), (5, 8)):
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            src = W._batch(W.BASE, batch, 24)[0].cuda()
            m = W.ours(W.BASE).eval().to("cuda", dtype)
            h = W.marian(W.BASE).eval().to("cuda", dtype)
            W.suppress_eos(m.output)
            W.suppress_eos(h.lm_head)

            def run_ours() -> int:
                out = (
                    greedy(m, src, max_len_a=0, max_len_b=64)
                    if beam == 1
                    else beam_search(m, src, beam, max_len_a=0, max_len_b=64)
                )
                return sum(map(len, out))

            def run_hf() -> int:
                with torch.no_grad():
                    seqs = h.generate(
                        input_ids=src,
                        attention_mask=src != W.PAD,
                        max_new_tokens=64,
                        num_beams=beam,
                        do_sample=False,
                        early_stopping=False,
                    )[:, 1:]
                return int((seqs != W.PAD).sum() - (seqs == W.EOS).sum())

            res = compare({"ours": run_ours, "HF generate": run_hf}, rounds=5, warmup=1)
            med, iqr = ratio(res, "ours", "HF generate")
            name = "greedy" if beam == 1 else "beam 5"
            print(
                f"base {name:7s} {str(dtype)[6:]:9s}: ours {res['ours']['median_s']:.3f} s, HF generate "
                f"{res['HF generate']['median_s']:.3f} s, HF/ours {med:.2f}x ±{iqr:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
    race_hf()
