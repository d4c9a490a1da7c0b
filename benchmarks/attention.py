"""Long-context attention: one attention layer's forward+backward and per-token decode time.

    python benchmarks/attention.py [--sizes 1024 2048 ...] [--heads 2] [--head-dim 64]

Table 1, forward + backward of the attention operation alone (no projections) on random
normal q, k, v of shape (1, heads, n, head_dim), fp32, causal, at n = 1k ... 32k:
- SDPA: exact causal softmax attention through `models.attention.attention` (the baseline);
- BASED: Taylor linear attention, chunked form (q, k of feature_dim 16; the kernel of the
  published 273-feature map computed with its 153-feature compact form; v of head_dim), chunk 64;
- Lizard: gated linear attention (Hedgehog features 2 x 64, chunked, chunk 64) plus its
  sliding window of 128 with 4 meta-memory sinks (`models.lizard.ops`), when models/lizard exists;
- HyperAttention with the reference defaults (block 256, sample 256, min_seq_len 4096, 7 LSH
  planes), and its relative output error ||O - O_exact|| / ||O_exact|| against SDPA's output
  on the same inputs (random inputs give near-uniform attention, HyperAttention's hard case),
  and the same error relative to the output for values v + 1 (a non-zero mean, as real values
  have): ||O - O_exact|| / ||O_exact + 1||, exact because both outputs are convex combinations
  of value rows.
Each time is the best of `--repeats` runs (after one warm-up call below n = 16k); the box is
shared, so single runs are noisy.

Table 2, decode: the time to produce one token's attention output at context n = 1k ... 16k:
KV-cache attention (one query over n cached keys, appending its key/value to a preallocated
cache) versus BASED's recurrent state (153 x head_dim per head) and Lizard's (GLA state plus a
128-key window), averaged over `--decode-steps` tokens (best of 3 runs).

`--clock cpu` times with this process's CPU time instead of wall time: with one thread it
leaves out the time other processes hold the core, which on a loaded shared box dominates.
Ratios are against SDPA (table 1) and against the same method at 1k (table 2), measured in the
same run. Intended for CPU (about 10 minutes on 2 busy cores with the defaults); runs on CUDA
too with `--device cuda`.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.attention import HyperParams, attention, hyper_attention
from models.attention.linear import (
    linear_attention_chunked,
    linear_attention_recurrent,
    taylor_state_dim,
)

BASED_FEATURE_DIM = 16  # BASED's published feature_dim (based-360m.yaml)
LIZARD_FEATURES, LIZARD_WINDOW, LIZARD_META = 64, 128, 4  # Lizard defaults: w = 128, m = 4 (arXiv 2507.09025, Table 13)
CHUNK = 64


def _lizard_ops():
    if importlib.util.find_spec("models.lizard") is None:
        return None
    from models.lizard import ops

    return ops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def _time(fn, repeats: int, device: torch.device, warmup: bool = True) -> float:
    if warmup:
        fn()
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        start = clock()
        fn()
        _sync(device)
        best = min(best, clock() - start)
    return best


def _fwd_bwd(forward, inputs):
    def run():
        for t in inputs:
            t.grad = None
        out = forward(*inputs)
        out.backward(torch.ones_like(out))

    return run


def forward_backward_table(sizes, heads, head_dim, repeats, device) -> list[dict]:
    """One row per n: seconds of forward+backward per method, and HyperAttention's error."""
    return [_forward_backward_row(n, heads, head_dim, repeats, device, _lizard_ops()) for n in sizes]


def _forward_backward_row(n, heads, head_dim, repeats, device, lizard) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(n)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_()

    q, k, v = rand(1, heads, n, head_dim), rand(1, heads, n, head_dim), rand(1, heads, n, head_dim)
    warm = n < 16384  # one warm-up call below 16k; above it the calls are long enough
    row = {"n": n}
    row["sdpa"] = _time(_fwd_bwd(lambda q, k, v: attention(q, k, v, causal=True), (q, k, v)), repeats, device, warm)

    fq, fk = rand(1, heads, n, BASED_FEATURE_DIM), rand(1, heads, n, BASED_FEATURE_DIM)
    based = lambda q, k, v: linear_attention_chunked(q, k, v, chunk_size=CHUNK)[0]
    row["based"] = _time(_fwd_bwd(based, (fq, fk, v)), repeats, device, warm)

    if lizard is not None:
        weight = rand(heads, head_dim, LIZARD_FEATURES)
        meta = rand(heads, LIZARD_META)
        log_gate = torch.nn.functional.logsigmoid(torch.randn(1, heads, n, generator=gen).to(device) + 4)

        def lizard_layer(q, k, v, weight, meta):
            phi_q, phi_k = lizard.hedgehog(q, weight), lizard.hedgehog(k, weight)
            gla, _ = lizard.gla_chunked(phi_q, phi_k, v, log_gate, chunk_size=CHUNK)
            window = lizard.window_attention(q, k, v, meta, window=LIZARD_WINDOW, scale=head_dim**-0.5)
            return gla + window

        row["lizard"] = _time(_fwd_bwd(lizard_layer, (q, k, v, weight, meta)), repeats, device, warm)

    params = HyperParams()
    directions = torch.randn(head_dim, params.lsh_num_projs, generator=gen).to(device)
    hyper = lambda q, k, v: hyper_attention(q, k, v, directions=directions, params=params, causal=True)
    row["hyper"] = _time(_fwd_bwd(hyper, (q, k, v)), repeats, device, warm)
    with torch.no_grad():
        exact = attention(q, k, v, causal=True)
        approx = hyper(q, k, v)
        row["hyper_error"] = float((approx - exact).norm() / exact.norm())
        # The same error against v + 1 (values with a non-zero mean, as real ones have): both
        # outputs are convex combinations of value rows (HyperAttention merges normalised
        # partials by LSE), so each output moves by exactly 1 and the error itself is unchanged.
        row["hyper_error_v_mean1"] = float((approx - exact).norm() / (exact + 1).norm())
    print(f"  n={n}: " + ", ".join(f"{key} {value:.4g}" for key, value in row.items() if key != "n"), flush=True)
    return row


def decode_table(contexts, heads, head_dim, steps, device) -> list[dict]:
    """One row per context n: seconds per decoded token per method."""
    return [_decode_row(n, heads, head_dim, steps, device, _lizard_ops()) for n in contexts]


def _decode_row(n, heads, head_dim, steps, device, lizard) -> dict:
    features = taylor_state_dim(BASED_FEATURE_DIM)
    gen = torch.Generator(device="cpu").manual_seed(n)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    row = {"n": n}
    with torch.no_grad():
        keys, values = rand(1, heads, n + steps, head_dim), rand(1, heads, n + steps, head_dim)
        tokens = [(rand(1, heads, 1, head_dim), rand(1, heads, 1, head_dim), rand(1, heads, 1, head_dim)) for _ in range(steps)]

        def kv_decode():
            for i, (q, k, v) in enumerate(tokens):
                keys[:, :, n + i : n + i + 1] = k
                values[:, :, n + i : n + i + 1] = v
                attention(q, keys[:, :, : n + i + 1], values[:, :, : n + i + 1], causal=True)

        row["kv_cache"] = _time(kv_decode, 3, device) / steps

        _, state = linear_attention_chunked(
            rand(1, heads, n, BASED_FEATURE_DIM), rand(1, heads, n, BASED_FEATURE_DIM), rand(1, heads, n, head_dim),
            chunk_size=CHUNK,
        )
        assert state[0].shape[-2] == features
        feature_tokens = [(rand(1, heads, 1, BASED_FEATURE_DIM), rand(1, heads, 1, BASED_FEATURE_DIM), v) for _, _, v in tokens]

        def based_decode():
            s = state
            for q, k, v in feature_tokens:
                _, s = linear_attention_recurrent(q, k, v, s)

        row["based"] = _time(based_decode, 3, device) / steps

        if lizard is not None:
            weight, meta = rand(heads, head_dim, LIZARD_FEATURES), rand(heads, LIZARD_META)
            gla_state = torch.zeros(1, heads, 2 * LIZARD_FEATURES, head_dim + 1, device=device)
            window_k, window_v = keys[:, :, n - LIZARD_WINDOW + 1 : n], values[:, :, n - LIZARD_WINDOW + 1 : n]
            log_gate = torch.full((1, heads, 1), -0.01, device=device)

            def lizard_decode():
                s, wk, wv = gla_state, window_k, window_v
                for q, k, v in tokens:
                    _, s = lizard.gla_recurrent(lizard.hedgehog(q, weight), lizard.hedgehog(k, weight), v, log_gate, s)
                    lizard.window_attention(
                        q, k, v, meta, window=LIZARD_WINDOW, scale=head_dim**-0.5, k_prefix=wk, v_prefix=wv
                    )
                    wk, wv = torch.cat([wk[:, :, 1:], k], 2), torch.cat([wv[:, :, 1:], v], 2)

            row["lizard"] = _time(lizard_decode, 3, device) / steps
    print(f"  n={n}: " + ", ".join(f"{key} {value * 1e3:.3f} ms" for key, value in row.items() if key != "n"), flush=True)
    return row


def _print_tables(fb_rows, decode_rows, args) -> None:
    has_lizard = "lizard" in fb_rows[0]
    print(f"\nForward+backward of one causal attention layer, B=1, H={args.heads}, head_dim={args.head_dim}, "
          f"fp32, {args.device} ({torch.get_num_threads()} threads); {args.clock} seconds (x = speed-up over SDPA)")
    cols = ["sdpa", "based"] + (["lizard"] if has_lizard else []) + ["hyper"]
    print("| n | " + " | ".join(cols) + " | hyper rel. error (v + 1) | growth per doubling (BASED" + (", Lizard" if has_lizard else "") + ") |")
    print("|---" * (len(cols) + 3) + "|")
    prev = None
    for row in fb_rows:
        cells = [f"{row['sdpa']:.3f}"] + [f"{row[c]:.3f} ({row['sdpa'] / row[c]:.1f}x)" for c in cols[1:]]
        growth = "-" if prev is None else ", ".join(f"{row[c] / prev[c]:.2f}" for c in cols[1:-1])
        print(f"| {row['n']} | " + " | ".join(cells) + f" | {row['hyper_error']:.3f} ({row['hyper_error_v_mean1']:.3f}) | {growth} |")
        prev = row
    if not has_lizard:
        print("(Lizard column left out: models/lizard is not importable in this checkout)")
    dcols = ["kv_cache", "based"] + (["lizard"] if "lizard" in decode_rows[0] else [])
    print(f"\nDecode, one token's attention at context n (H={args.heads}, head_dim={args.head_dim}); "
          "ms per token (ratio to the same method at the first context)")
    print("| n | " + " | ".join(dcols) + " |")
    print("|---" * (len(dcols) + 1) + "|")
    first = decode_rows[0]
    for row in decode_rows:
        print(f"| {row['n']} | " + " | ".join(f"{row[c] * 1e3:.3f} ({row[c] / first[c]:.2f}x)" for c in dcols) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1 avoids OpenMP stalls on a busy box)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall",
        help="wall time, or this process's CPU time (steadier on a shared box when --threads is 1; CPU only)",
    )
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print("forward+backward:", flush=True)
    fb_rows = forward_backward_table(args.sizes, args.heads, args.head_dim, args.repeats, device)
    print("decode:", flush=True)
    decode_rows = decode_table(args.contexts, args.heads, args.head_dim, args.decode_steps, device)
    _print_tables(fb_rows, decode_rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
