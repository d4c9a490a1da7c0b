"""`wren hparams`: the Step Law's optimal lr and batch size, beside the other published laws.

Two ways in:

* `wren hparams --params N --tokens D [--seq-len L]`: N non-embedding parameters, D training
  tokens (`1.2e9`, `1.2B`, `300M`, `20T` all work). This path imports no torch and answers in a
  fraction of a second.
* `wren hparams CONFIG [--section.key=value ...]`: N is counted from the config's model at the
  tokenizer's vocabulary (`data.vocab_size`), D = training.steps x global_batch_size x seq_len.
  `--apply CONFIG --out NEW.toml` writes the config with the Step Law's lr and batch filled in.

N here is the Step Law's (and Kaplan's) non-embedding count: the weight matrices of the
transformer blocks, without the token embedding, the output head (tied or not) and the norm gains.
`Llama.num_params(exclude_embeddings=True)` differs from it by the norm gains and, for an untied
model, the output head; `count_non_embedding` says exactly what is counted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import textwrap
from pathlib import Path
from typing import Any

from optim.laws import LAWS, Prediction, Scale, predict
from trainer.errors import UserError

MAX_PARAMS = 1e13  # 10 trillion non-embedding parameters: beyond any model trained so far, 10x over
MAX_TOKENS = 1e15  # 1 quadrillion tokens: ~30x the largest published pretraining runs
MAX_SEQ_LEN = 10_000_000
DEFAULT_SEQ_LEN = 2048  # the sequence length the Step Law was fitted at
APPLY_LAW = "step_law"
_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


class HparamsError(UserError):
    """A bad `wren hparams` argument; exit code 2 like argparse's usage errors."""

    exit_code = 2


def parse_count(text: str, flag: str) -> float:
    """Read `1.2e9`, `1_200_000_000`, `1.2B`, `300M`, `7k` or `20T` as a number."""
    raw = text.strip().replace("_", "")
    match = re.fullmatch(r"([0-9.eE+-]+)\s*([kKmMbBgGtT]?)", raw)
    try:
        value = float(match.group(1)) * _SUFFIXES.get(match.group(2).lower(), 1.0) if match else None
    except ValueError:
        value = None
    if value is None:
        raise HparamsError(f"{flag}: cannot read {text!r} as a number (write e.g. 1.2e9, 1.2B, 300M or 20T)")
    return value


def check_scale(scale: Scale, n_from: str = "--params", d_from: str = "--tokens") -> None:
    """Reject sizes no law can say anything about, naming where the value came from and the limit."""
    n, d = scale.n_params, scale.tokens
    if not math.isfinite(n) or n < 1:
        raise HparamsError(f"{n_from}: N must be a positive number of parameters, got {n:g}")
    if n > MAX_PARAMS:
        raise HparamsError(f"{n_from}: N = {n:.3g} is absurd (more than {MAX_PARAMS:.0e} non-embedding parameters)")
    if not math.isfinite(d) or d < 1:
        raise HparamsError(f"{d_from}: D must be a positive number of tokens, got {d:g}")
    if d > MAX_TOKENS:
        raise HparamsError(f"{d_from}: D = {d:.3g} is absurd (more than {MAX_TOKENS:.0e} training tokens)")
    if not 1 <= scale.seq_len <= MAX_SEQ_LEN:
        raise HparamsError(f"--seq-len: must be between 1 and {MAX_SEQ_LEN}, got {scale.seq_len}")
    if scale.loss is not None and not (math.isfinite(scale.loss) and 0 < scale.loss <= 50):
        raise HparamsError(f"--loss: must be a loss in nats/token between 0 and 50, got {scale.loss:g}")


def check_laws(names: list[str] | None) -> list[str]:
    """The requested law names (all by default); an unknown one lists the known ones."""
    for name in names or []:
        if name not in LAWS:
            raise HparamsError(f"--law: unknown law {name!r}; known: {', '.join(LAWS)}")
    return list(dict.fromkeys(names)) if names else list(LAWS)


def count_non_embedding(model_cfg: Any) -> int:
    """N of a Llama-shaped config: per block, q/k/v/o projections (GQA-aware) and the 3 SwiGLU matrices.

    The same matrices as the Step Law's `L (4 h^2 + 3 h d_ff)` for full multi-head attention; no
    embedding, no output head, no norm gains.
    """
    fields = ("dim", "n_layers", "n_heads", "kv_heads", "head_dim", "ffn_hidden_dim")
    if not all(hasattr(model_cfg, f) for f in fields):
        raise HparamsError(f"cannot count N for a {type(model_cfg).__name__}; pass --params and --tokens instead")
    q_dim = model_cfg.n_heads * model_cfg.head_dim
    kv_dim = model_cfg.kv_heads * model_cfg.head_dim
    attention = 2 * model_cfg.dim * q_dim + 2 * model_cfg.dim * kv_dim
    feed_forward = 3 * model_cfg.dim * model_cfg.ffn_hidden_dim
    return model_cfg.n_layers * (attention + feed_forward)


def scale_from_config(cfg: Any, loss: float | None = None) -> Scale:
    """N, D, seq_len and shape of a loaded `JobConfig`."""
    model_cfg = cfg.model.build_model_config(cfg.data.vocab_size)
    t = cfg.training
    return Scale(
        n_params=float(count_non_embedding(model_cfg)),
        tokens=float(t.steps * t.global_batch_size * t.seq_len),
        seq_len=t.seq_len,
        n_layers=model_cfg.n_layers,
        dim=model_cfg.dim,
        vocab_size=model_cfg.vocab_size,
        loss=loss,
    )


def round_batch(sequences: float, multiple: int) -> int:
    """The nearest multiple of `multiple` (at least one multiple), so the batch divides evenly."""
    return max(multiple, multiple * math.floor(sequences / multiple + 0.5))


def round_lr(lr: float) -> float:
    """Three significant digits: the laws are not more precise than that."""
    return float(f"{lr:.3g}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `wren hparams` flags (registered by trainer/cli.py)."""
    p.add_argument("config", nargs="?", help="a TOML recipe to read N and D from; --section.key=value overrides follow")
    p.add_argument("--params", metavar="N", help="non-embedding parameters, e.g. 1.2e9, 1.2B, 300M")
    p.add_argument("--tokens", metavar="D", help="training tokens, e.g. 1e11, 100B, 2T")
    p.add_argument("--seq-len", metavar="L", type=int, default=None, help=f"sequence length (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--law", nargs="+", action="extend", metavar="NAME", help=f"laws to show (default all: {', '.join(LAWS)})")
    p.add_argument("--loss", metavar="L", type=float, help="expected final loss (nats/token) for Kaplan's critical batch")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--apply", metavar="CONFIG", help="write CONFIG with the Step Law's lr and batch to --out")
    p.add_argument("--out", metavar="NEW.toml", help="where --apply writes")
    p.add_argument("--world-size", metavar="W", type=int, default=1, help="ranks the applied batch must divide over (default 1)")
    p.add_argument("--force", action="store_true", help="let --apply overwrite an existing --out file")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    """Run `wren hparams`; returns the exit code. User errors raise `UserError`."""
    config = _config_path(args)
    laws = check_laws(args.law)
    if args.world_size < 1:
        raise HparamsError(f"--world-size: must be at least 1, got {args.world_size}")
    if config is None:
        if overrides:
            raise HparamsError(f"unexpected arguments {' '.join(overrides)} (overrides need a CONFIG)")
        if args.params is None or args.tokens is None:
            raise HparamsError("give --params N and --tokens D, or a CONFIG")
        scale = Scale(
            n_params=parse_count(args.params, "--params"),
            tokens=parse_count(args.tokens, "--tokens"),
            seq_len=DEFAULT_SEQ_LEN if args.seq_len is None else args.seq_len,
            loss=args.loss,
        )
        check_scale(scale)
        cfg = None
    else:
        if args.params is not None or args.tokens is not None or args.seq_len is not None:
            raise HparamsError("--params/--tokens/--seq-len do not go with a CONFIG (override it: --training.seq_len=...)")
        from trainer.config import JobConfig  # imports torch: only on the config path

        cfg = JobConfig.load(config, overrides)  # the world size only constrains the applied batch
        scale = scale_from_config(cfg, loss=args.loss)
        check_scale(scale, f"{config} (model)", f"{config} (training.steps x global_batch_size x seq_len)")

    predictions = predict(scale, laws)
    step = predict(scale, [APPLY_LAW])[0]
    multiple = args.world_size * max(cfg.training.micro_batch_size, 1) if cfg is not None else args.world_size
    recommended = {
        "law": APPLY_LAW,
        "lr": round_lr(step.lr),
        "global_batch_size": round_batch(step.batch_sequences, multiple),
        "batch_multiple": multiple,
    }
    applied = _apply(cfg, scale, recommended, args) if args.apply else None
    if args.json:
        print(json.dumps(_as_json(scale, config, predictions, recommended, applied), indent=2))
    else:
        print(_as_text(scale, cfg, config, predictions, step, recommended, applied))
    return 0


def _config_path(args: argparse.Namespace) -> str | None:
    if args.apply is not None:
        if args.config is not None and args.config != args.apply:
            raise HparamsError(f"give the config once: {args.config!r} and --apply {args.apply!r}")
        if args.out is None:
            raise HparamsError("--apply needs --out NEW.toml (wren does not rewrite the recipe in place)")
        return args.apply
    if args.out is not None:
        raise HparamsError("--out only goes with --apply CONFIG")
    return args.config


def _apply(cfg: Any, scale: Scale, recommended: dict, args: argparse.Namespace) -> dict:
    """Fill the Step Law's lr and batch into the config, keep D by adjusting steps, write --out."""
    out = Path(args.out)
    if out.exists() and not args.force:
        raise HparamsError(f"--out: '{out}' exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise HparamsError(f"--out: directory '{out.parent}' does not exist")
    t = cfg.training
    before = {"optimizer.lr": cfg.optimizer.lr, "training.global_batch_size": t.global_batch_size, "training.steps": t.steps}
    cfg.optimizer.lr = recommended["lr"]
    t.global_batch_size = recommended["global_batch_size"]
    t.steps = max(1, math.floor(scale.tokens / (t.global_batch_size * t.seq_len) + 0.5))
    try:
        cfg.validate(args.world_size)
    except UserError as err:
        batch = t.global_batch_size
        raise HparamsError(f"--apply: the predicted batch of {batch} sequences gives an invalid config: {err}") from None
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(cfg.to_toml())
    os.replace(tmp, out)
    after = {"optimizer.lr": cfg.optimizer.lr, "training.global_batch_size": t.global_batch_size, "training.steps": t.steps}
    return {"out": str(out), "before": before, "after": after, "tokens": t.steps * t.global_batch_size * t.seq_len}


def _as_json(scale: Scale, config: str | None, predictions: list[Prediction], recommended: dict, applied: dict | None) -> dict:
    inputs = {k: getattr(scale, k) for k in ("n_params", "tokens", "seq_len", "n_layers", "dim", "vocab_size", "loss")}
    return {
        "inputs": {**inputs, "config": config},
        "predictions": [p.to_dict() for p in predictions],
        "recommended": recommended,
        "applied": applied,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _as_text(
    scale: Scale,
    cfg: Any,
    config: str | None,
    predictions: list[Prediction],
    step: Prediction,
    recommended: dict,
    applied: dict | None,
) -> str:
    ratio = scale.tokens / scale.n_params
    lines = []
    if cfg is None:
        lines.append(f"N = {scale.n_params:.4g} non-embedding parameters, D = {scale.tokens:.4g} tokens")
        lines[-1] += f" ({ratio:.3g} tokens/param)"
    else:
        t = cfg.training
        lines.append(
            f"{config}: {cfg.model.name}/{cfg.model.flavor}, N = {scale.n_params:,.0f} non-embedding parameters "
            f"({scale.n_layers} layers x dim {scale.dim}, vocab {scale.vocab_size} not counted)"
        )
        lines.append(f"D = {t.steps} steps x {t.global_batch_size} seqs x {t.seq_len} = {scale.tokens:,.0f} tokens")
        lines[-1] += f" ({ratio:.3g} tokens/param)"
    lines.append("")
    rows = [("law", "lr", "batch tokens", f"batch seqs@{scale.seq_len}", "fit range")]
    for p in predictions:
        status = "n/a" if not p.applicable else ("extrapolated" if p.extrapolated else "inside")
        rows.append((p.law, _fmt(p.lr, ".3e"), _fmt(p.batch_tokens, ".4g"), _fmt(p.batch_sequences, ".1f"), status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append("")
    for p in predictions:
        note = textwrap.wrap(f"note: {p.note}", width=100, initial_indent="  ", subsequent_indent="        ")
        lines += [f"{p.law}: {p.formula}", f"  source: {p.source}", *note]
    if ratio < 1:
        lines.append(f"warning: D/N = {ratio:.3g} tokens per parameter is far below every law's fitted range")
    lines.append("")
    lines.append(
        f"Step Law: optimizer.lr = {recommended['lr']:g}, training.global_batch_size = {recommended['global_batch_size']} "
        f"({step.batch_sequences:.1f} sequences of {scale.seq_len}, rounded"
        + (f" to a multiple of {recommended['batch_multiple']})" if recommended["batch_multiple"] > 1 else ")")
    )
    if applied is not None:
        b, a = applied["before"], applied["after"]
        changes = ", ".join(f"{k} {b[k]:g} -> {a[k]:g}" for k in a)
        lines.append(f"wrote {applied['out']}: {changes} (steps keep D at {applied['tokens']:,} tokens)")
    return "\n".join(lines)
