"""Training throughput of wren against a plain Hugging Face loop, same shape, batch, dtype and threads.

    python benchmarks/throughput.py [--dtype float32 bfloat16] [--batch 8] [--seq-len 512] [--steps 1]
                                    [--rounds 5] [--warmup 1] [--threads N] [--flavor small] [--json out.json]

Both sides train the same Llama (wren's `small` flavor by default: dim 512, 8 layers, 8 heads,
SwiGLU 1376, vocab 8192, untied; 33.7M parameters) on the same batches of a small text corpus
(the `.py` files of a few standard-library packages, tokenized by wren's data pipeline):

- wren: a real `trainer.train.Trainer` built from `JobConfig.load(None, overrides)`, timed over
  `trainer.train_step(trainer.loader.next_batch())` (wren's whole step: forward, loss, backward,
  grad-norm clip, lr schedule, AdamW, zero_grad).
- hf: `transformers.LlamaForCausalLM` of the same shape (`hf_adapter.to_hf_config`, sdpa attention,
  no KV cache, fp32 weights copied from wren's seeded initialisation), `torch.optim.AdamW` with
  wren's lr, betas, eps, weight decay and parameter groups (foreach left at torch's default), the
  same lr schedule, `clip_grad_norm_(1.0)`, `zero_grad(set_to_none=True)`, bf16 through
  `torch.autocast("cpu")`, and the same cross-entropy on fp32 logits. Its batches come from
  wren's `TokenLoader` on the same shard, so step k of both sides sees the same tokens and the
  two loss curves must agree (the report prints the largest difference).

Each side lives in its own spawned worker process, built once per dtype, with the same thread
count. The parent runs the measurement rounds alternately (A B, B A, A B, ...), one worker
computing at a time, so that background load on the machine hits both sides alike. Before each
side's steps in each round the parent measures the dtype's matmul peak
(`trainer.peak_flops.measure_matmul_flops_per_s`, same thread count), and it records how busy
the rest of the machine was (from /proc/stat, minus the worker's own CPU time) while that side
ran. Reported per side: median and best tokens/s over rounds; MFU = `flops_per_token(seq_len)` x
tokens/s / the matmul peak measured around that round (mean of the measurements right before and
right after that side's steps), median over rounds, so that the peak and the steps see the same
background load (on a shared VM the 2-thread peak itself swings by 2x from minute to minute); the
MFU of the median tokens/s against the largest peak measured in the run (start included), the most
conservative figure; and peak memory. The wren/HF ratio is the median of the per-round ratios (the ratio of medians and of
the best rounds are printed too, and the median over the quiet rounds, those in which other
processes used < 5% of the CPU during both sides' steps: load that changes between the two
halves of a round skews that round's ratio). Targets: ratio >= 1.0 and wren MFU >= 40%.

Peak memory: CPU has no allocator high-water mark, so each worker reports its peak RSS
(`getrusage(RUSAGE_SELF).ru_maxrss`) and its growth over the RSS peak it had after importing
torch, transformers and wren (identical imports on both sides) and before building anything.
Data preparation runs in the parent, so neither side's memory or time includes it.

bfloat16 is skipped, with the reason printed, on CPUs without a fast bf16 matmul (no
avx512_bf16 / AMX: torch falls back to a ~1 GFLOP/s scalar GEMM); `--force-bf16` runs it anyway.

Exit code 0 unless something errors: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data.samples import copy_stdlib_sample  # noqa: E402 (needs the repository on sys.path)
from trainer.config_loader import override_args  # noqa: E402

MFU_TARGET = 0.40
RATIO_TARGET = 1.0
QUIET_BUSY = 0.05  # a round is "quiet" when other processes used less than this share of the CPU


# ----------------------------------------------------------------------------- shared setup


def wren_overrides(args: argparse.Namespace, dtype: str, work: Path, total_steps: int) -> list[str]:
    """The `--section.key=value` overrides of the benchmark job (shared by both sides)."""
    values: dict[str, object] = {
        "run.name": f"throughput_{dtype}",
        "run.output_dir": str(work / "runs"),
        "data.source": "text",
        "data.paths": [str(work / "corpus")],
        "data.vocab_size": args.vocab_size,
        "data.cache_dir": str(args.cache_dir or work / "data_cache"),
        "model.flavor": args.flavor,
        "training.steps": total_steps,
        "training.seq_len": args.seq_len,
        "training.global_batch_size": args.batch,
        "training.dtype": dtype,
        "schedule.warmup_steps": min(20, total_steps),
        "eval.every_steps": 0,
        "eval.batches": 1,
        "eval.batch_size": 1,
        "checkpoint.every_steps": 0,
        "checkpoint.resume": False,
        "metrics.tensorboard": False,
        "metrics.plot": False,
        "parallel.num_threads": args.threads,
    }
    return override_args(values)


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ----------------------------------------------------------------------------- workers


class _WrenSide:
    """wren's own training step on a `Trainer`."""

    def __init__(self, overrides: list[str]):
        from trainer.config import JobConfig
        from trainer.distributed import init_distributed
        from trainer.train import Trainer

        cfg = JobConfig.load(None, overrides)
        self.trainer = Trainer(cfg, init_distributed(cfg.parallel))
        self.trainer.model.train()
        self.num_params = self.trainer.num_params
        self.flops_per_token = self.trainer.flops_per_token

    def step(self) -> float:
        return self.trainer.train_step(self.trainer.loader.next_batch()).loss


class _HFSide:
    """A plain `LlamaForCausalLM` + `torch.optim.AdamW` loop with wren's hyperparameters."""

    def __init__(self, overrides: list[str]):
        import torch
        import transformers

        from data import TokenLoader, TokenShard, prepare_data
        from models.llama import Llama, hf_adapter
        from trainer.config import JobConfig

        cfg = JobConfig.load(None, overrides)
        self.cfg = cfg
        torch.set_num_threads(cfg.parallel.num_threads or os.cpu_count() or 1)
        prepared = prepare_data(cfg.data, log=lambda *_: None)
        model_config = cfg.model.build_model_config(prepared.vocab_size)
        # Same initial weights as wren's side: wren's seeded init, copied into the HF model.
        torch.manual_seed(cfg.run.seed)
        wren_model = Llama(model_config)
        self.num_params = wren_model.num_params()
        self.flops_per_token = wren_model.flops_per_token(cfg.training.seq_len)
        state = hf_adapter.to_hf_state_dict(
            {k: v.detach().clone() for k, v in wren_model.state_dict().items()}, model_config
        )
        del wren_model
        hf_config = hf_adapter.to_hf_config(model_config)
        hf_config.use_cache = False  # training: no KV cache (the fairer, cheaper baseline)
        model = transformers.LlamaForCausalLM._from_config(hf_config, attn_implementation="sdpa")
        result = model.load_state_dict(state, strict=False)
        expected_missing = ["lm_head.weight"] if model_config.tie_embeddings else []
        if result.unexpected_keys or sorted(result.missing_keys) != expected_missing:
            raise RuntimeError(f"HF load: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
        del state
        self.model = model.float().train()
        embedding = self.model.get_input_embeddings().weight
        decay, no_decay = [], []
        for param in self.model.parameters():  # wren's groups: no decay on vectors and the embedding
            (no_decay if param.ndim < 2 or param is embedding else decay).append(param)
        opt = cfg.optimizer
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=opt.lr,
            betas=(opt.beta1, opt.beta2),
            eps=opt.eps,
        )
        self.loader = TokenLoader(  # as `Trainer` builds it, so both sides see the same batches
            TokenShard(prepared.train_path),
            seq_len=cfg.training.seq_len,
            global_batch_size=cfg.training.global_batch_size,
            shuffle_seed=cfg.run.seed,
        )
        self.dtype = getattr(torch, cfg.training.dtype)
        self.step_index = 0

    def step(self) -> float:
        import torch
        import torch.nn.functional as F

        batch = self.loader.next_batch()
        inputs, targets = batch[:, :-1], batch[:, 1:]
        if self.dtype == torch.float32:
            logits = self.model(input_ids=inputs, use_cache=False).logits
        else:
            with torch.autocast("cpu", dtype=self.dtype):
                logits = self.model(input_ids=inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.training.grad_clip_norm or math.inf)
        lr = self.cfg.optimizer.lr * self.cfg.schedule.lr_multiplier(self.step_index, self.cfg.training.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1
        return loss.item()


def worker_main(side: str, overrides: list[str], conn) -> None:
    """A worker process: build one side, then run steps on request and report times and memory."""
    try:
        import torch  # noqa: F401  identical imports on both sides before the memory baseline
        import transformers  # noqa: F401
        from transformers import LlamaForCausalLM  # noqa: F401

        import data  # noqa: F401
        import trainer.train  # noqa: F401
        from models.llama import hf_adapter  # noqa: F401

        base_peak, base_now = _rss_peak(), _rss_now()
        start = time.perf_counter()
        impl = _WrenSide(overrides) if side == "wren" else _HFSide(overrides)
        conn.send(
            {
                "ok": True,
                "num_params": impl.num_params,
                "flops_per_token": impl.flops_per_token,
                "build_s": time.perf_counter() - start,
                "threads": torch.get_num_threads(),
            }
        )
        while True:
            msg = conn.recv()
            if msg[0] == "steps":
                times, losses = [], []
                for _ in range(msg[1]):
                    t0 = time.perf_counter()
                    losses.append(impl.step())
                    times.append(time.perf_counter() - t0)
                conn.send({"ok": True, "times": times, "losses": losses})
            elif msg[0] == "memory":
                conn.send(
                    {
                        "ok": True,
                        "base_peak": base_peak,
                        "base_now": base_now,
                        "peak": _rss_peak(),
                        "now": _rss_now(),
                    }
                )
            else:
                conn.send({"ok": True})
                return
    except BaseException as err:  # report to the parent instead of dying silently
        import traceback

        conn.send({"ok": False, "error": f"{side}: {err!r}\n{traceback.format_exc()}"})
        raise


class Worker:
    """Parent-side handle on one worker process."""

    def __init__(self, ctx, side: str, overrides: list[str]):
        self.side = side
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(side, overrides, child), daemon=True)
        self.process.start()
        child.close()
        self.info = self._recv()

    def _recv(self) -> dict:
        try:
            reply = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.side} worker died (exit code {self.process.exitcode})") from None
        if not reply.get("ok"):
            raise RuntimeError(reply.get("error", "worker failed"))
        return reply

    def ask(self, *msg) -> dict:
        self.conn.send(msg)
        return self._recv()

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.ask("stop")
            except (RuntimeError, OSError):
                pass
            self.process.join(timeout=30)
            if self.process.is_alive():
                self.process.kill()


# ----------------------------------------------------------------------------- measurement


def measure_peak(dtype_name: str, threads: int) -> float:
    import torch

    from trainer.peak_flops import measure_matmul_flops_per_s

    torch.set_num_threads(threads)
    return measure_matmul_flops_per_s(getattr(torch, dtype_name), torch.device("cpu"))


def bf16_matmul_support(threads: int) -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 matrices at a useful rate (a quick 512^3 probe against fp32).

    Without avx512_bf16 / AMX (e.g. AMD Zen 3, AVX2 only) torch falls back to a scalar bf16 GEMM
    that runs ~1 GFLOP/s, and a bf16 training step of the default shape would take many minutes.
    """
    import torch

    from trainer.peak_flops import measure_matmul_flops_per_s

    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    fp32 = measure_matmul_flops_per_s(torch.float32, cpu, size=512, repeats=3)
    bf16 = measure_matmul_flops_per_s(torch.bfloat16, cpu, size=512, repeats=3)
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    hw = sorted(flags & {"avx512_bf16", "amx_bf16", "avx_ne_convert"}) or ["no avx512_bf16/amx_bf16"]
    detail = (
        f"512^3 matmul probe: bf16 {bf16 / 1e9:.1f} GFLOP/s vs fp32 {fp32 / 1e9:.1f} GFLOP/s; "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}; cpu flags: {', '.join(hw)}"
    )
    return bf16 >= 0.5 * fp32, detail


def _cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all CPUs; steal counts as busy)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by process `pid`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_round(worker: Worker, steps: int) -> dict:
    """Run `steps` steps on `worker`; also measure how busy the rest of the machine was meanwhile."""
    busy0, own0, parent0 = _cpu_busy_s(), _process_cpu_s(worker.process.pid), time.process_time()
    wall0 = time.perf_counter()
    reply = worker.ask("steps", steps)
    wall = time.perf_counter() - wall0
    own = _process_cpu_s(worker.process.pid) - own0 + time.process_time() - parent0
    foreign = max(0.0, _cpu_busy_s() - busy0 - own)
    return {**reply, "busy_elsewhere": foreign / (wall * (os.cpu_count() or 1))}


def run_dtype(args: argparse.Namespace, dtype: str, work: Path, ctx) -> dict:
    total_steps = args.warmup + args.rounds * args.steps
    if dtype == "bfloat16":
        fast, detail = bf16_matmul_support(args.threads)
        print(f"\n=== bfloat16: {detail}", flush=True)
        if not fast and not args.force_bf16:
            print("    no fast bf16 matmul on this CPU: skipping bfloat16 (--force-bf16 runs it anyway)", flush=True)
            return {"dtype": dtype, "skipped": f"no fast bf16 matmul on this CPU ({detail})"}
    overrides = wren_overrides(args, dtype, work, total_steps)
    print(f"\n=== {dtype}: measuring the matmul peak ({args.threads} threads) ...", flush=True)
    peak_start = measure_peak(dtype, args.threads)
    print(f"    matmul peak at start: {peak_start / 1e9:.1f} GFLOP/s; building both sides ...", flush=True)
    workers: dict[str, Worker] = {}
    sides = ("wren", "hf")
    try:
        for side in sides:  # one after the other, so the builds do not compete
            workers[side] = Worker(ctx, side, overrides)
            info = workers[side].info
            print(
                f"    {side}: {info['num_params'] / 1e6:.2f}M params, {info['flops_per_token'] / 1e6:.1f} MFLOP/token, "
                f"{info['threads']} threads, built in {info['build_s']:.1f}s",
                flush=True,
            )
        flops_per_token = workers["wren"].info["flops_per_token"]
        if workers["hf"].info["flops_per_token"] != flops_per_token:
            raise RuntimeError("the two sides built different shapes")
        losses: dict[str, list[float]] = {side: [] for side in sides}
        if args.warmup:
            for side in sides:
                reply = workers[side].ask("steps", args.warmup)
                losses[side] += reply["losses"]
                print(f"    warmup {side}: {args.warmup} step(s), {sum(reply['times']):.1f}s", flush=True)
        tokens_per_step = args.batch * args.seq_len
        rounds: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(args.rounds):
            order = sides if r % 2 == 0 else sides[::-1]  # A B, B A, A B, ...
            for side in order:
                # The peak right before and right after this side's steps: the same background load.
                peak_before = measure_peak(dtype, args.threads)
                reply = timed_round(workers[side], args.steps)
                peak = (peak_before + measure_peak(dtype, args.threads)) / 2
                losses[side] += reply["losses"]
                tokens_per_s = args.steps * tokens_per_step / sum(reply["times"])
                rounds[side].append(
                    {
                        "tokens_per_s": tokens_per_s,
                        "peak": peak,
                        "mfu": flops_per_token * tokens_per_s / peak,
                        "busy_elsewhere": reply["busy_elsewhere"],
                    }
                )
            w, h = rounds["wren"][-1], rounds["hf"][-1]
            print(
                f"    round {r + 1}/{args.rounds}: wren {w['tokens_per_s']:,.0f} tok/s (MFU {100 * w['mfu']:.1f}%, "
                f"peak {w['peak'] / 1e9:.0f}G, busy elsewhere {100 * w['busy_elsewhere']:.0f}%), "
                f"hf {h['tokens_per_s']:,.0f} tok/s (MFU {100 * h['mfu']:.1f}%, peak {h['peak'] / 1e9:.0f}G, "
                f"busy elsewhere {100 * h['busy_elsewhere']:.0f}%): ratio {w['tokens_per_s'] / h['tokens_per_s']:.3f}",
                flush=True,
            )
        memory = {side: workers[side].ask("memory") for side in sides}
        num_params = workers["wren"].info["num_params"]
    finally:
        for worker in workers.values():
            worker.close()
    return {
        "dtype": dtype,
        "peak_start": peak_start,
        "flops_per_token": flops_per_token,
        "num_params": num_params,
        "rounds": rounds,
        "losses": losses,
        "memory": memory,
    }


def summarize(res: dict) -> dict:
    """Medians over rounds, the wren/HF ratios and the verdicts of one dtype's result."""
    out = {"dtype": res["dtype"], "sides": {}}
    max_peak = max([res["peak_start"]] + [r["peak"] for rounds in res["rounds"].values() for r in rounds])
    for side, rounds in res["rounds"].items():
        tps = [r["tokens_per_s"] for r in rounds]
        mem = res["memory"][side]
        out["sides"][side] = {
            "tokens_per_s": statistics.median(tps),
            "best_tokens_per_s": max(tps),
            "mfu": statistics.median(r["mfu"] for r in rounds),
            "mfu_vs_max_peak": res["flops_per_token"] * statistics.median(tps) / max_peak,
            "rss_growth": mem["peak"] - mem["base_peak"],
            "rss_peak": mem["peak"],
        }
    w, h = out["sides"]["wren"], out["sides"]["hf"]
    out["ratio"] = w["tokens_per_s"] / h["tokens_per_s"]
    out["paired_ratio"] = statistics.median(
        a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(res["rounds"]["wren"], res["rounds"]["hf"])
    )
    out["best_ratio"] = w["best_tokens_per_s"] / h["best_tokens_per_s"]
    quiet = [
        a["tokens_per_s"] / b["tokens_per_s"]
        for a, b in zip(res["rounds"]["wren"], res["rounds"]["hf"])
        if max(a["busy_elsewhere"], b["busy_elsewhere"]) < QUIET_BUSY
    ]
    out["quiet_rounds"] = len(quiet)
    out["quiet_ratio"] = statistics.median(quiet) if quiet else None
    out["memory_ratio"] = w["rss_growth"] / max(1, h["rss_growth"])
    out["ratio_pass"] = out["paired_ratio"] >= RATIO_TARGET
    out["mfu_pass"] = w["mfu"] >= MFU_TARGET
    return out


def report(res: dict, args: argparse.Namespace) -> str:
    if "skipped" in res:
        return f"dtype {res['dtype']}: SKIPPED: {res['skipped']}"
    gib = 2**30
    summary = summarize(res)
    peaks = [r["peak"] for rounds in res["rounds"].values() for r in rounds]
    busy = [r["busy_elsewhere"] for rounds in res["rounds"].values() for r in rounds]
    lines = [
        f"dtype {res['dtype']}: {res['num_params'] / 1e6:.2f}M params, batch {args.batch} x seq {args.seq_len}, "
        f"{args.threads} threads, {res['flops_per_token'] / 1e6:.1f} MFLOP/token; {args.rounds} interleaved rounds x "
        f"{args.steps} step(s) per side after {args.warmup} warmup step(s)",
        f"matmul peak ({args.threads} threads): {res['peak_start'] / 1e9:.1f} GFLOP/s at start, "
        f"{min(peaks) / 1e9:.1f} .. {max(peaks) / 1e9:.1f} next to the rounds; CPU busy with other processes "
        f"during the rounds: {100 * min(busy):.0f} .. {100 * max(busy):.0f}%",
        "MFU: median over rounds of flops/token x tokens/s / the peak measured around that round; "
        "MFU vs max peak: median tokens/s / the largest peak measured in the run (the most conservative)",
    ]
    header = (
        f"| {'side':<4} | {'tokens/s (median)':>17} | {'tokens/s (best)':>15} | {'MFU':>6} | "
        f"{'MFU vs max peak':>15} | {'peak RSS growth':>15} | {'peak RSS':>9} |"
    )
    lines.append(header)
    lines.append("|" + "|".join("-" * len(part) for part in header.split("|")[1:-1]) + "|")
    for side in ("wren", "hf"):
        s = summary["sides"][side]
        lines.append(
            f"| {side:<4} | {s['tokens_per_s']:>17,.1f} | {s['best_tokens_per_s']:>15,.1f} | {100 * s['mfu']:>5.1f}% | "
            f"{100 * s['mfu_vs_max_peak']:>14.1f}% | {s['rss_growth'] / gib:>11.3f} GiB | {s['rss_peak'] / gib:>5.2f} GiB |"
        )
    lines.append(
        f"wren/hf: tokens/s {summary['paired_ratio']:.3f}x (median of per-round ratios; ratio of medians "
        f"{summary['ratio']:.3f}x, of best rounds {summary['best_ratio']:.3f}x), peak RSS growth {summary['memory_ratio']:.3f}x"
    )
    if summary["quiet_rounds"]:
        lines.append(
            f"wren/hf over the {summary['quiet_rounds']} quiet rounds (other processes < {100 * QUIET_BUSY:.0f}% of the "
            f"CPU during both sides' steps): tokens/s {summary['quiet_ratio']:.3f}x (median)"
        )
    diffs = [abs(a - b) for a, b in zip(res["losses"]["wren"], res["losses"]["hf"])]
    lines.append(
        f"losses: first step wren {res['losses']['wren'][0]:.5f} / hf {res['losses']['hf'][0]:.5f}; "
        f"largest |difference| over all {len(diffs)} steps {max(diffs):.2e}"
    )
    tolerance = 1e-3 if res["dtype"] == "float32" else 5e-2
    if abs(res["losses"]["wren"][0] - res["losses"]["hf"][0]) > tolerance:
        lines.append(
            f"WARNING: the first-step losses differ by more than {tolerance:g}: the two sides are not training the "
            "same model on the same batches, and the comparison is not valid"
        )
    wren = summary["sides"]["wren"]
    lines.append(
        f"target wren/hf tokens/s >= {RATIO_TARGET:.1f}: {'PASS' if summary['ratio_pass'] else 'FAIL'} "
        f"({summary['paired_ratio']:.3f}); target wren MFU >= {100 * MFU_TARGET:.0f}%: "
        f"{'PASS' if summary['mfu_pass'] else 'FAIL'} ({100 * wren['mfu']:.1f}%)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=1, help="timed steps per side per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side before the rounds")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0: all cores)")
    parser.add_argument("--flavor", default="small", help="wren Llama flavor (default small: 33.7M params)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--cache-dir", default="", help="reuse prepared data here (default: a temp dir)")
    parser.add_argument(
        "--force-bf16", action="store_true", help="run bfloat16 even where the CPU has no fast bf16 matmul"
    )
    parser.add_argument("--json", default="", help="also write the raw results to this JSON file")
    args = parser.parse_args(argv)
    if min(args.steps, args.rounds, args.batch, args.seq_len) < 1 or args.warmup < 0:
        parser.error("--steps, --rounds, --batch and --seq-len must be positive, --warmup non-negative")
    args.threads = args.threads or os.cpu_count() or 1
    os.environ.pop("WORLD_SIZE", None)  # one process per side, no process group

    import torch
    import transformers

    print(
        f"throughput: torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} cores, {args.threads} threads, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wren_throughput_") as tmp:
        work = Path(tmp)
        copy_stdlib_sample(work / "corpus")
        # Prepare (tokenize) the data once here, so that neither worker's memory or time includes it.
        from data import prepare_data
        from trainer.config import JobConfig

        cfg = JobConfig.load(None, wren_overrides(args, args.dtype[0], work, 1))
        t0 = time.perf_counter()
        prepared = prepare_data(cfg.data, log=lambda *_: None)
        print(f"data: {prepared.directory} (vocab {prepared.vocab_size}) in {time.perf_counter() - t0:.1f}s", flush=True)
        ctx = mp.get_context("spawn")
        results = [run_dtype(args, dtype, work, ctx) for dtype in args.dtype]
    print(f"\nthroughput: done in {time.perf_counter() - started:.0f}s, load average {os.getloadavg()[0]:.2f}\n")
    for res in results:
        print(report(res, args))
        print()
    if args.json:
        summaries = [summarize(res) for res in results if "skipped" not in res]
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "summaries": summaries}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
