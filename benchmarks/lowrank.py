"""Memory-efficient pretraining, one run: AdamW vs GaLore vs Fira vs low-rank + refactorization + reset.

    python benchmarks/lowrank.py [--steps 100] [--seq-len 128] [--threads 2]
                                 [--micro-batch N] [--activation-checkpointing] [--json out.json]

The same Llama (20.4M parameters: dim 384, 8 layers, 6 heads, SwiGLU 1024, vocab 8192, untied)
trains on the same tokens of the embedded corpus (the standard library's source, wren's default
data: `--steps` x 8 sequences x `--seq-len` tokens) with each method, through wren's real trainer
(`trainer.train.Trainer` built from the config; its `train_step` and `evaluate`; float32, cosine
schedule with 10 warmup steps, no clipping; `--micro-batch` and `--activation-checkpointing` apply
to every method alike):

- adamw:   torch fused AdamW, lr 3e-3 (wren's default; the full-rank baseline);
- galore:  rank 96 (= dim / 4, GaLore Table 2's 128 / 512), scale 0.25, lr 0.01 (GaLore Table 2),
           projector refresh every `--steps` / 2 steps;
- fira:    the same, plus Fira's residual (limiter gamma 1.01);
- lowrank: every attention and MLP weight W = (32 / 96) B A (rank 96, alpha 32 as the reference's
           scripts/60m_low_rank.sh), lr 3e-3, refactorization and momentum reset (10-step lr
           recovery) every `--steps` / 2 steps (Glentis et al. 2025 do both every 200 of 10K+).

Each method runs in its own subprocess, one after the other (data is prepared first, in the parent).
Reported per method: eval loss and perplexity on the held-out split (4 x 16 sequences, the same
for all); optimizer-state bytes, all of them and those of the GaLore target weights (the 2-D
attention / MLP matrices; for AdamW the same matrices; low-rank has replaced them by factors);
weights + gradients + optimizer state; peak memory twice: the peak bytes of live tensors over one
steady-state training step (`LiveTensorPeak`: what a GPU allocator's high-water mark would show;
the step just before the timed period, in which low-rank refactorizes and resets), and the growth
of the process's peak RSS over the training steps above its RSS after imports (it adds the data,
allocator caching and fragmentation, the same for every method); tokens/s over the last
`--steps` / 2 steps, which are exactly one GaLore refresh period that starts with its SVD step.
Ratios are against AdamW and GaLore of the same run.

Targets (issue 4, after the papers): GaLore's optimizer state <= 0.35x AdamW's on the projected
weights; low-rank + refactorization + reset reaches an eval loss <= GaLore's with <= 0.8x its
peak memory; GaLore's step time <= 1.15x AdamW's over a refresh period. Activations are the same
for every method (the architecture is), and at 8 x 128 tokens per forward they outweigh the states
the methods differ in; `--micro-batch 2 --activation-checkpointing` shrinks them, as a
memory-constrained run would (see benchmarks/RESULTS.md for both settings). A few hundred steps of a
20M model on a shared 2-core CPU are far from the papers' 1.3B-token runs: read the losses as a
smoke test of the methods' relative behaviour at this budget, not as a replication.

Exit code 0 unless something errors: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from memory_probe import measure_in_subprocess, peak_rss_bytes, reset_peak_rss, rss_bytes, tracked_step  # noqa: E402

MODEL = {
    "model.flavor": "small",
    "model.dim": 384,
    "model.n_layers": 8,
    "model.n_heads": 6,
    "model.ffn_hidden_dim": 1024,
}
METHODS = {
    "adamw": {"optimizer.name": "adamw", "optimizer.lr": 3e-3},
    "galore": {
        "optimizer.name": "galore",
        "optimizer.lr": 0.01,
        "optimizer.galore.rank": 96,
        "optimizer.galore.scale": 0.25,
    },
    "fira": {
        "optimizer.name": "fira",
        "optimizer.lr": 0.01,
        "optimizer.galore.rank": 96,
        "optimizer.galore.scale": 0.25,
    },
    "lowrank": {
        "optimizer.name": "lowrank",
        "optimizer.lr": 3e-3,
        "optimizer.lowrank.rank": 96,
        "optimizer.lowrank.alpha": 32.0,
        "optimizer.reset_warmup_steps": 10,
    },
}


def overrides(method: str, steps: int, out_dir: str, threads: int, seq_len: int = 128) -> list[str]:
    """The run's `--section.key=value` overrides."""
    from trainer.config_loader import override_args

    period = max(1, steps // 2)
    values = {
        "run.name": method,
        "run.output_dir": out_dir,
        **MODEL,
        "data.source": "stdlib",
        "data.vocab_size": 8192,
        "training.steps": steps,
        "training.seq_len": seq_len,
        "training.global_batch_size": 8,
        "training.grad_clip_norm": 0.0,
        "optimizer.beta1": 0.9,
        "optimizer.beta2": 0.999,
        "optimizer.eps": 1e-6,
        "optimizer.weight_decay": 0.0,
        "schedule.name": "cosine",
        "schedule.warmup_steps": min(10, steps),
        "eval.every_steps": 0,
        "eval.batches": 4,
        "eval.batch_size": 16,
        "checkpoint.every_steps": 0,
        "checkpoint.keep_last": 1,
        "metrics.log_every_steps": max(1, period // 5),
        "metrics.tensorboard": False,
        "metrics.plot": False,
        "metrics.peak_flops_per_s": 1e11,
        "parallel.num_threads": threads,
        **METHODS[method],
    }
    if method in ("galore", "fira"):
        values["optimizer.galore.update_proj_gap_steps"] = period
    if method == "lowrank":
        values["optimizer.reset_every_steps"] = period
        values["optimizer.lowrank.refactor_every_steps"] = period
    return override_args(values)


def run_one(method: str, steps: int, out_dir: str, threads: int, seq_len: int, extra: list[str]) -> dict:
    """Train one method in this process with the trainer's own step; returns its numbers."""
    import time

    import torch

    from optim.builder import galore_targets
    from trainer.config import JobConfig
    from trainer.distributed import init_distributed
    from trainer.metrics import optimizer_state_bytes, parameter_bytes
    from trainer.train import Trainer

    cfg = JobConfig.load(None, overrides(method, steps, out_dir, threads, seq_len) + extra)
    baseline = rss_bytes()
    trainer = Trainer(cfg, init_distributed(cfg.parallel))
    reset_peak_rss()  # the peak of the training steps, not of building the trainer
    period = max(1, steps // 2)
    tracked = max(1, steps - period - 1)  # a steady-state step (state allocated), before the timed period
    trainer.model.train()
    for step in range(steps):
        if step == steps - period:
            start = time.perf_counter()
        if step == tracked:
            tensor_peak = tracked_step(trainer)
        else:
            trainer.train_step(trainer.loader.next_batch())
    elapsed = time.perf_counter() - start
    peak = peak_rss_bytes()
    eval_loss = trainer.evaluate()
    targets = galore_targets(cfg.optimizer.galore.target_patterns)
    on_targets = 0
    for name, param in trainer.model.named_parameters():
        if targets(name, param) and param in trainer.optimizer.state:
            on_targets += sum(
                v.numel() * v.element_size() for v in trainer.optimizer.state[param].values() if torch.is_tensor(v)
            )
    return {
        "method": method,
        "params": trainer.num_params,
        "eval_loss": eval_loss,
        "param_bytes": parameter_bytes(trainer.model),
        "optimizer_bytes": optimizer_state_bytes(trainer.optimizer),
        "optimizer_bytes_on_targets": on_targets,
        "peak_rss_growth_bytes": peak - baseline,
        "peak_tensor_bytes": tensor_peak,
        "tokens_per_s": period * trainer.tokens_per_step / elapsed,
    }


def table(rows: list[dict]) -> str:
    """The results as a plain-text table with ratios against AdamW and GaLore."""
    by = {r["method"]: r for r in rows}
    adamw, galore = by["adamw"], by["galore"]
    head = (
        f"{'method':<8} {'params':>7} {'eval loss':>9} {'ppl':>8} {'opt state':>10} {'on W':>9} {'/AdamW':>7} "
        f"{'W+G+state':>10} {'/GaLore':>8} {'peak tensors':>13} {'/GaLore':>8} "
        f"{'peak RSS+':>10} {'/GaLore':>8} {'tok/s':>7} {'AdamW/x':>8}"
    )
    lines = [head, "-" * len(head)]
    mib = 2**20

    def static(r: dict) -> int:  # weights + gradients (same bytes) + optimizer state
        return 2 * r["param_bytes"] + r["optimizer_bytes"]

    for r in rows:
        on_w = f"{r['optimizer_bytes_on_targets'] / mib:8.1f}M" if r["method"] != "lowrank" else "      --"
        ratio_w = (
            f"{r['optimizer_bytes_on_targets'] / adamw['optimizer_bytes_on_targets']:6.2f}x"
            if r["method"] != "lowrank"
            else "     --"
        )
        lines.append(
            f"{r['method']:<8} {r['params'] / 1e6:6.1f}M {r['eval_loss']:9.4f} {math.exp(r['eval_loss']):8.1f} "
            f"{r['optimizer_bytes'] / mib:9.1f}M {on_w} {ratio_w} "
            f"{static(r) / mib:9.1f}M {static(r) / static(galore):7.2f}x "
            f"{r['peak_tensor_bytes'] / mib:12.1f}M "
            f"{r['peak_tensor_bytes'] / galore['peak_tensor_bytes']:7.2f}x "
            f"{r['peak_rss_growth_bytes'] / mib:9.0f}M {r['peak_rss_growth_bytes'] / galore['peak_rss_growth_bytes']:7.2f}x "
            f"{r['tokens_per_s']:7.0f} {adamw['tokens_per_s'] / r['tokens_per_s']:7.2f}x"
        )
    low = by["lowrank"]
    checks = [
        (
            "GaLore optimizer state on the projected weights <= 0.35x AdamW's",
            galore["optimizer_bytes_on_targets"] / adamw["optimizer_bytes_on_targets"] <= 0.35,
        ),
        ("low-rank + refactor + reset eval loss <= GaLore's", low["eval_loss"] <= galore["eval_loss"]),
        (
            "low-rank + refactor + reset peak memory (live tensors) <= 0.8x GaLore's",
            low["peak_tensor_bytes"] <= 0.8 * galore["peak_tensor_bytes"],
        ),
        (
            "low-rank + refactor + reset peak memory (RSS growth) <= 0.8x GaLore's",
            low["peak_rss_growth_bytes"] <= 0.8 * galore["peak_rss_growth_bytes"],
        ),
        (
            "low-rank + refactor + reset weights + grads + optimizer state <= 0.8x GaLore's",
            static(low) <= 0.8 * static(galore),
        ),
        (
            "GaLore step time <= 1.15x AdamW's over a refresh period",
            adamw["tokens_per_s"] / galore["tokens_per_s"] <= 1.15,
        ),
    ]
    lines.append("")
    lines += [f"{'PASS' if ok else 'MISS'}  {text}" for text, ok in checks]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per method (default 100)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op CPU threads (default 2)")
    parser.add_argument(
        "--micro-batch", type=int, default=0, help="sequences per forward/backward (default 0: all 8 at once)"
    )
    parser.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute every block in backward (all methods)"
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--one", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from trainer.config_loader import override_args

    extra = override_args(
        {
            "training.micro_batch_size": args.micro_batch,
            "training.activation_checkpointing": args.activation_checkpointing,
        }
    )
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.out, args.threads, args.seq_len, extra)))
        return 0

    from trainer.config import JobConfig
    from trainer.train import prepare_data_or_fail

    with tempfile.TemporaryDirectory() as out:
        prepare_data_or_fail(
            JobConfig.load(None, overrides("adamw", args.steps, out, args.threads, args.seq_len)).data, log=print
        )
        rows = []
        for method in METHODS:
            print(f"benchmark: training {method} for {args.steps} steps ...", flush=True)
            cmd = [
                sys.executable,
                __file__,
                "--one",
                method,
                "--steps",
                str(args.steps),
                "--out",
                out,
                "--threads",
                str(args.threads),
                "--seq-len",
                str(args.seq_len),
                "--micro-batch",
                str(args.micro_batch),
                *(["--activation-checkpointing"] if args.activation_checkpointing else []),
            ]
            rows.append(measure_in_subprocess(cmd, cwd=ROOT))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
