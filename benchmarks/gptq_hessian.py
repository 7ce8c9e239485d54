"""GPTQ's Hessian products on a GPU: float32, TF32, and 16-bit tensor-core products summed in float32 (whole batches
or chunks of tokens, lowbit.methods.gptq.accumulate), each against a float64 accumulation of the same tokens.

The layer inputs are generated bf16 activations made ill-conditioned like a real o_proj's: a low-rank part, small
noise and per-channel log-normal scales; 262,144 tokens in batches of 16,384 (the pipeline's). Prints each way's
time, its largest error relative to the mean diagonal and, at width 4096, the spectral norm of its error and the
smallest eigenvalue of H against GPTQ's dampening. Run on a GPU machine:

    python benchmarks/gptq_hessian.py
"""

import time

import torch

from lowbit.methods import gptq

dev = "cuda"


def data(n, T, rank):
    # low-rank structure, per-channel lognormal scales (outlier channels), small noise: ill-conditioned like o_proj
    B = torch.randn(rank, n, device=dev) / rank ** 0.5
    scale = torch.exp(torch.randn(n, device=dev) * 1.0)
    out = []
    for _ in range(0, T, 16384):
        z = torch.randn(16384, rank, device=dev)
        x = (z @ B + 0.02 * torch.randn(16384, n, device=dev)) * scale
        out.append(x.to(torch.bfloat16))
    return out


def run(batches, n, sixteen, chunk, tf32=False):
    gptq.SIXTEEN_BIT_PRODUCTS, gptq.CHUNK_TOKENS = sixteen, chunk
    torch.backends.cuda.matmul.allow_tf32 = tf32
    st = gptq.init_stats(n, dev)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for x in batches:
        gptq.accumulate(st, x)
    torch.cuda.synchronize()
    torch.backends.cuda.matmul.allow_tf32 = False
    return st.H, time.perf_counter() - t


def ref(batches, n):
    H = torch.zeros(n, n, dtype=torch.float64, device=dev)
    for x in batches:
        xd = x.double()
        H.addmm_(xd.T, xd)
    return H * (2 / sum(x.shape[0] for x in batches))


def main() -> None:
    torch.manual_seed(0)
    variants = [("float32", False, 0, False), ("TF32", False, 0, True), ("16-bit whole batch", True, 16384, False),
                ("16-bit chunk 2048", True, 2048, False)]
    for n, rank in ((4096, 1024), (14336, 2048)):
        batches = data(n, 262144, rank)
        R = ref(batches, n)
        md = R.diagonal().mean().item()
        if n == 4096:
            ev = torch.linalg.eigvalsh(R)
            print(f"n={n}: mean diag {md:.3g}, damp {0.01 * md:.3g}, eig min {ev[0].item():.3g} "
                  f"max {ev[-1].item():.3g}")
        else:
            print(f"n={n}: mean diag {md:.3g}")
        for name, sixteen, chunk, tf32 in variants:
            run(batches[:1], n, sixteen, chunk, tf32)
            H, secs = run(batches, n, sixteen, chunk, tf32)
            E = H.double() - R
            line = f"  {name:20s} {secs:6.3f} s  max|dH|/meandiag {E.abs().max().item() / md:.2e}"
            if n == 4096:
                e = torch.linalg.eigvalsh(E)
                emin = torch.linalg.eigvalsh(H.double())[0].item()
                line += (f"  |eig(dH)| {max(-e[0].item(), e[-1].item()):.3g}  eig min(H) {emin:.3g} "
                         f"(damp {0.01 * md:.3g})")
            print(line, flush=True)
        del batches, R
        torch.cuda.empty_cache()
    gptq.SIXTEEN_BIT_PRODUCTS, gptq.CHUNK_TOKENS = True, 2048


if __name__ == "__main__":
    main()
