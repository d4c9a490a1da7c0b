"""Fine-tuning methods, one run: full fine-tuning vs LoRA vs SpIEL vs LoRAM vs QLoRAM.

    python benchmarks/finetune.py [--flavor small] [--pretrain-steps 150] [--steps 40]
                                  [--seq-len 128] [--threads 2] [--json out.json]

1. Pretrain a base Llama (`--flavor`, the recipe configs/tiny.toml otherwise) with `wren train` on
   part of the embedded corpus: the standard library's packages except the held-out ones below.
2. Fine-tune it on the held-out packages (a slice of the same embedded corpus the base never saw,
   tokenised with the base's tokenizer) with each method's recipe from `configs/` (its method
   settings; steps, batch, lr and data are the same for all): `full`, `lora` (r = 8), `spiel`
   (density matched to LoRA r = 8 on the same layers), `loram` (LoRA r = 8 trained on the model
   with 50% structured pruning, recovered and merged into the full model) and `qloram` (the same,
   the pruned frozen weights in NF4).

Each method runs in its own subprocess, through wren's real trainer (`Trainer` built from the
recipe; its `train_step` and `evaluate`). Reported per method: the eval loss on the held-out
slice's validation split before and after fine-tuning (for LoRAM and QLoRAM "after" is the merged
FULL model, exported with the method's own export and evaluated as a full model; the pruned
model's loss is shown beside it), trainable parameters, bytes of the frozen weights, optimizer-state
bytes, peak memory twice (the peak bytes of live tensors over one steady-state training step,
`benchmarks/memory_probe.py`, what a GPU allocator's high-water mark would show; and the growth of
the process's peak RSS over the training steps above its RSS after building the trainer) and
tokens/s over the second half of the steps.

Targets (issue 7): SpIEL eval loss <= LoRA's at <= 1.1x LoRA's peak memory; LoRAM peak memory
<= 0.6x LoRA's, its merged full model better than the un-tuned model and within a stated margin
of LoRA's; QLoRAM frozen-weight bytes <= 0.3x of bf16 (of the full model's frozen weights in
bf16, as LoRAM's reduction ratio counts; the table also shows the ratio to the pruned model's own
weights in bf16, which the embeddings, kept dense, dominate at CPU sizes). The margin is stated here: LoRAM's merged
eval loss within 0.1 nats of LoRA's. The memory targets come from 7B-70B models, where the
frozen weights dominate; at CPU sizes the embeddings (which LoRAM does not prune) and the
activations weigh far more, so read the ratios together with the frozen-weight bytes column.

Exit code 0 unless something errors: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Held out from pretraining; the fine-tuning data. Packages present in every CPython 3.10+.
FINETUNE_PACKAGES = ("email", "json", "http", "urllib")
PRETRAIN_PACKAGES = (
    "asyncio", "collections", "concurrent", "ctypes", "dbm", "encodings", "html", "importlib",
    "logging", "multiprocessing", "sqlite3", "unittest", "wsgiref", "xml", "xmlrpc", "zoneinfo",
)  # fmt: skip
METHODS = {
    "full": "configs/finetune_full.toml",
    "lora": "configs/finetune_lora.toml",
    "spiel": "configs/finetune_spiel.toml",
    "loram": "configs/finetune_loram.toml",
    "qloram": "configs/finetune_qloram.toml",
}
MERGED = ("loram", "qloram")  # methods whose trained model is not the full model
LORAM_MARGIN_NATS = 0.1  # the stated margin of LoRAM's merged eval loss over LoRA's


def common_overrides(args: argparse.Namespace, out: Path, name: str) -> dict:
    """Settings shared by the pretraining and every fine-tuning run."""
    return {
        "run.name": name,
        "run.output_dir": str(out),
        "model.name": "llama",
        "model.flavor": args.flavor,
        "data.source": "text",
        "data.vocab_size": 8192,
        "data.val_fraction": 0.1,
        "data.cache_dir": str(out / "cache"),
        "training.seq_len": args.seq_len,
        "training.global_batch_size": 8,
        "training.grad_clip_norm": 1.0,
        "eval.every_steps": 0,
        "eval.batches": 4,
        "eval.batch_size": 8,
        "checkpoint.every_steps": 0,
        "checkpoint.keep_last": 1,
        "metrics.tensorboard": False,
        "metrics.plot": False,
        "metrics.peak_flops_per_s": 1e11,
        "parallel.num_threads": args.threads,
    }


def finetune_overrides(args: argparse.Namespace, out: Path, method: str) -> list[str]:
    """The overrides of one fine-tuning run (the recipe keeps its method settings)."""
    from trainer.config_loader import override_args

    values = common_overrides(args, out, method)
    values.update(
        {
            "data.paths": [str(out / "finetune_corpus")],
            "finetune.init_from": str(out / "base"),
            "training.steps": args.steps,
            "schedule.name": "cosine",
            "schedule.warmup_steps": max(1, args.steps // 10),
            "optimizer.lr": 1e-4 if method == "full" else 2e-3,
            "optimizer.weight_decay": 0.0,
            "metrics.log_every_steps": max(1, args.steps // 4),
        }
    )
    return override_args(values)


def evaluate_full_model(hf_dir: Path, args: argparse.Namespace, out: Path) -> float:
    """Eval loss of the full model exported to `hf_dir`, on the fine-tuning data's validation split."""
    from trainer.config import JobConfig
    from trainer.config_loader import override_args
    from trainer.distributed import init_distributed
    from trainer.train import Trainer

    values = common_overrides(args, out, "merged_eval")
    values.update({"data.paths": [str(out / "finetune_corpus")], "finetune.init_from": str(hf_dir), "training.steps": 1, "schedule.warmup_steps": 0})
    cfg = JobConfig.load(ROOT / METHODS["full"], override_args(values))
    return Trainer(cfg, init_distributed(cfg.parallel)).evaluate()


def frozen_weight_bytes(model) -> tuple[int, int]:
    """(bytes the frozen weights take as stored, bytes they would take in bf16).

    Frozen means parameters without gradients plus buffers; an NF4 layer's codes and absmaxes are
    its stored bytes and its `out_features x in_features` weight is what bf16 would hold.
    """
    stored = bf16_numel = 0
    for module in model.modules():
        tensors = [p for p in module.parameters(recurse=False) if not p.requires_grad]
        tensors += list(module.buffers(recurse=False))
        stored += sum(t.numel() * t.element_size() for t in tensors)
        if hasattr(module, "nf4_codes"):
            bf16_numel += module.out_features * module.in_features
        else:
            bf16_numel += sum(p.numel() for p in module.parameters(recurse=False) if not p.requires_grad)
    return stored, 2 * bf16_numel


def run_one(method: str, args: argparse.Namespace, out: Path) -> dict:
    """Fine-tune with one method in this process; returns its numbers."""
    from memory_probe import peak_rss_bytes, reset_peak_rss, rss_bytes, tracked_step

    from trainer.config import JobConfig
    from trainer.distributed import init_distributed
    from trainer.finetune import FINETUNE_METHODS
    from trainer.finetune_build import trainable_summary
    from trainer.metrics import optimizer_state_bytes
    from trainer.train import Trainer

    cfg = JobConfig.load(ROOT / METHODS[method], finetune_overrides(args, out, method))
    trainer = Trainer(cfg, init_distributed(cfg.parallel))
    before = trainer.evaluate()
    trainable, total = trainable_summary(trainer.model)
    baseline = rss_bytes()
    reset_peak_rss()
    half = max(1, args.steps // 2)
    trainer.model.train()
    for step in range(args.steps):
        if step == args.steps - half:
            start = time.perf_counter()
        if step == args.steps - half - 1:
            tensor_peak = tracked_step(trainer)
        else:
            trainer.train_step(trainer.loader.next_batch())
    elapsed = time.perf_counter() - start
    peak_rss = peak_rss_bytes() - baseline
    after = trainer.evaluate()
    row = {
        "method": method,
        "params": total,
        "trainable": trainable,
        "frozen_bytes": frozen_weight_bytes(trainer.model)[0],
        "frozen_bf16_bytes": frozen_weight_bytes(trainer.model)[1],
        "optimizer_bytes": optimizer_state_bytes(trainer.optimizer),
        "peak_tensor_bytes": tensor_peak,
        "peak_rss_growth_bytes": peak_rss,
        "tokens_per_s": half * trainer.tokens_per_step / elapsed,
        "eval_before": before,
        "eval_after": after,
        "eval_trained_model": after,
    }
    if method in MERGED:
        trainer.save_checkpoint()
        merged_dir = out / f"{method}_merged"
        FINETUNE_METHODS["loram"].load_export()(trainer.run_dir, merged_dir, merged=True, log=print)
        row["eval_after"] = evaluate_full_model(merged_dir, args, out)
    return row


def ratio(part: int, whole: int) -> str:
    """`part / whole` as a 6-wide "0.27x", or "--" when there is nothing frozen to compare (full fine-tuning)."""
    return f"{part / whole:5.2f}x" if whole > 2**20 else "    --"


def table(rows: list[dict]) -> str:
    """The results as a plain-text table with ratios against LoRA."""
    by = {r["method"]: r for r in rows}
    lora = by["lora"]
    mib = 2**20
    head = (
        f"{'method':<7} {'params':>7} {'trainable':>10} {'eval before':>11} {'eval after':>10} {'(trained)':>9} "
        f"{'frozen W':>9} {'/bf16':>6} {'opt state':>10} {'peak tensors':>13} {'/LoRA':>6} {'peak RSS+':>10} "
        f"{'/LoRA':>6} {'tok/s':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['method']:<7} {r['params'] / 1e6:6.1f}M {r['trainable'] / 1e6:9.3f}M {r['eval_before']:11.4f} "
            f"{r['eval_after']:10.4f} {r['eval_trained_model']:9.4f} {r['frozen_bytes'] / mib:8.1f}M "
            f"{ratio(r['frozen_bytes'], r['frozen_bf16_bytes'])} {r['optimizer_bytes'] / mib:9.2f}M "
            f"{r['peak_tensor_bytes'] / mib:12.1f}M {r['peak_tensor_bytes'] / lora['peak_tensor_bytes']:5.2f}x "
            f"{r['peak_rss_growth_bytes'] / mib:9.0f}M {r['peak_rss_growth_bytes'] / max(1, lora['peak_rss_growth_bytes']):5.2f}x "
            f"{r['tokens_per_s']:7.0f}"
        )
    untuned = lora["eval_before"]
    checks = []
    if "spiel" in by:
        spiel = by["spiel"]
        checks += [
            ("SpIEL eval loss <= LoRA's", spiel["eval_after"] <= lora["eval_after"]),
            ("SpIEL peak memory (live tensors) <= 1.1x LoRA's", spiel["peak_tensor_bytes"] <= 1.1 * lora["peak_tensor_bytes"]),
        ]
    if "loram" in by:
        loram = by["loram"]
        checks += [
            ("LoRAM peak memory (live tensors) <= 0.6x LoRA's", loram["peak_tensor_bytes"] <= 0.6 * lora["peak_tensor_bytes"]),
            ("LoRAM merged full model better than the un-tuned model", loram["eval_after"] < untuned),
            (
                f"LoRAM merged eval loss within {LORAM_MARGIN_NATS} nats of LoRA's",
                loram["eval_after"] <= lora["eval_after"] + LORAM_MARGIN_NATS,
            ),
        ]
    if "qloram" in by:
        q = by["qloram"]
        checks.append(
            (
                "QLoRAM frozen-weight bytes <= 0.3x of the full model's in bf16 (LoRAM's reduction ratio)",
                q["frozen_bytes"] <= 0.3 * lora["frozen_bf16_bytes"],
            )
        )
    lines.append("")
    lines += [f"{'PASS' if ok else 'MISS'}  {text}" for text, ok in checks]
    return "\n".join(lines)


def pretrain(args: argparse.Namespace, out: Path) -> None:
    """Copy the two corpus slices and pretrain the base model on the first with `wren train`."""
    from data.samples import copy_stdlib_sample
    from trainer.config_loader import override_args

    copy_stdlib_sample(out / "pretrain_corpus", PRETRAIN_PACKAGES)
    copy_stdlib_sample(out / "finetune_corpus", FINETUNE_PACKAGES)
    values = common_overrides(args, out, "base")
    values.update(
        {
            "data.paths": [str(out / "pretrain_corpus")],
            "training.steps": args.pretrain_steps,
            "schedule.warmup_steps": max(1, args.pretrain_steps // 10),
            "metrics.log_every_steps": max(1, args.pretrain_steps // 10),
        }
    )
    cmd = [sys.executable, "-m", "trainer.cli", "train", "configs/tiny.toml", *override_args(values)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    latest = (out / "base" / "checkpoints" / "latest").read_text().strip()
    if latest != f"step_{args.pretrain_steps:08d}":
        raise SystemExit(f"benchmark: the base run stopped early ({latest}); rerun")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="small", help="Llama flavor of the base model (default small, 33.7M)")
    parser.add_argument("--pretrain-steps", type=int, default=150, help="steps of base pretraining (default 150)")
    parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps per method (default 40)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op CPU threads (default 2)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run (LoRA always)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--one", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args, Path(args.out))))
        return 0
    from memory_probe import measure_in_subprocess

    methods = ["lora", *[m for m in args.methods if m != "lora"]]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        print(f"benchmark: pretraining the {args.flavor} base for {args.pretrain_steps} steps ...", flush=True)
        pretrain(args, out)
        rows = []
        for method in methods:
            print(f"benchmark: fine-tuning with {method} for {args.steps} steps ...", flush=True)
            cmd = [sys.executable, __file__, "--one", method, "--out", str(out)]
            cmd += ["--flavor", args.flavor, "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
            rows.append(measure_in_subprocess(cmd, cwd=ROOT))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
