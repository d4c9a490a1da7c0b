"""`wren mup-check CONFIG`: the muP coordinate check (Yang et al. 2022, arXiv 2203.03466; `mup.coord_check` in the mup package).

For each width, the recipe's model is built at that width (MLP width in proportion), trained a
few AdamW steps at a constant lr on the recipe's data, and the mean absolute activation
("l1", as `mup.coord_check.get_coord_data` records it) of every block's attention, MLP and
output, the embedding and the logits is recorded at each step, under the standard
parametrisation and under muP. Under muP the hidden curves are flat in width; under the
standard one they grow. Writes a PNG (rows: parametrisations, columns: steps) and a JSON of
the numbers, and prints each parametrisation's steepest growth exponent: the slope of
log l1 against log width, over hidden modules, at the last step (0 = flat, 1 = linear growth).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import UserError

PARAMETRISATIONS = ("standard", "mup")
# Modules whose output is recorded, by name (Llama-family names); the root's output is the logits.
RECORDED = re.compile(r"^(tok_embeddings|layers\.\d+|layers\.\d+\.attention|layers\.\d+\.feed_forward)$")
HIDDEN = re.compile(r"^layers\.")  # the modules whose flatness the summary judges
FLAT_SLOPE = 0.2  # a growth exponent below this reads as flat in the summary line (a heuristic)


@dataclass
class CoordCheck:
    """l1[parametrisation][module][step] -> one value per width."""

    widths: list[int]
    steps: int
    l1: dict[str, dict[str, list[list[float]]]]

    def slope(self, parametrisation: str, module: str, step: int) -> float:
        """Least-squares slope of log l1 against log width at `step`."""
        xs = [math.log(w) for w in self.widths]
        ys = [math.log(max(v, 1e-30)) for v in self.l1[parametrisation][module][step]]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)

    def max_hidden_slope(self, parametrisation: str, step: int | None = None) -> float:
        """The steepest |slope| over hidden modules at `step` (default: the last)."""
        step = self.steps - 1 if step is None else step
        modules = [m for m in self.l1[parametrisation] if HIDDEN.match(m)]
        return max(abs(self.slope(parametrisation, m, step)) for m in modules)


def _model_at(cfg, vocab_size: int, width: int, parametrisation: str, seed: int):
    """The recipe's model at `width` (muP applied or not) and its per-parameter lr scales."""
    from models import get_model_spec
    from optim.mup import apply_mup
    from trainer.extensions import BuildContext

    model_cfg = cfg.model.build_model_config(vocab_size)
    ratio = model_cfg.ffn_hidden_dim / model_cfg.dim
    model_cfg = dataclasses.replace(model_cfg, dim=width, ffn_hidden_dim=max(1, round(ratio * width)))
    mup_cfg = dataclasses.replace(
        cfg.mup, enabled=parametrisation == "mup", base_ffn_hidden_dim=max(1, round(ratio * cfg.mup.base_dim))
    )
    torch.manual_seed(seed)
    try:
        model = get_model_spec(cfg.model.name).model_cls(model_cfg)
    except ValueError as err:
        raise UserError(f"mup-check: width {width}: {err}") from None
    ctx = BuildContext(cfg=dataclasses.replace(cfg, mup=mup_cfg), env=None, log=lambda *a, **k: None)
    return apply_mup(model, ctx), ctx.lr_scales


def _record(model: nn.Module, store: dict[str, list[float]]):
    """Forward hooks appending mean |output| of each recorded module (and the logits) to `store`."""
    handles = []
    for name, module in model.named_modules():
        label = "logits" if module is model else name
        if module is model or RECORDED.match(name):
            def hook(mod, args, out, label=label):
                store.setdefault(label, []).append(out.detach().abs().mean().item())

            handles.append(module.register_forward_hook(hook))
    return handles


def coord_check(
    cfg, batches: list[torch.Tensor], vocab_size: int, widths: list[int], lr: float, seeds: list[int]
) -> CoordCheck:
    """Train each width for len(batches) steps under each parametrisation, recording activations.

    Each value is the mean over `seeds` (initialisations), as mup's `get_coord_data(nseeds=...)`.
    """
    from optim.builder import build_optimizer

    opt_cfg = dataclasses.replace(cfg.optimizer, lr=lr)
    l1: dict[str, dict[str, list[list[float]]]] = {}
    for parametrisation in PARAMETRISATIONS:
        per_module: dict[str, list[list[float]]] = {}
        for width in widths:
            store: dict[str, list[float]] = {}
            for seed in seeds:
                model, lr_scales = _model_at(cfg, vocab_size, width, parametrisation, seed)
                optimizer = build_optimizer(opt_cfg, model, lr_scales)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                handles = _record(model, store)
                for batch in batches:
                    logits = model(batch[:, :-1])
                    F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten()).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for handle in handles:
                    handle.remove()
            for module, values in store.items():  # seed-major: values[seed * steps + step]
                rows = per_module.setdefault(module, [[] for _ in batches])
                for step in range(len(batches)):
                    rows[step].append(sum(values[step :: len(batches)]) / len(seeds))
        l1[parametrisation] = per_module
    return CoordCheck(widths=widths, steps=len(batches), l1=l1)


def plot(result: CoordCheck, out: Path, title: str) -> Path:
    """Rows: parametrisations; columns: steps; one line per module, l1 against width (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(PARAMETRISATIONS), result.steps
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), dpi=110, squeeze=False, sharex=True)
    for r, parametrisation in enumerate(PARAMETRISATIONS):
        modules = result.l1[parametrisation]
        colors = plt.cm.viridis([i / max(1, len(modules) - 1) for i in range(len(modules))])
        for c in range(cols):
            ax = axes[r][c]
            for color, (module, values) in zip(colors, modules.items()):
                ax.plot(result.widths, values[c], marker="o", markersize=3, linewidth=1, color=color, label=module)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{parametrisation}, step {c + 1}", fontsize=9)
            ax.grid(alpha=0.3)
            if r == rows - 1:
                ax.set_xlabel("width")
            if c == 0:
                ax.set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML recipe (model, data, optimizer, [mup] base_dim)")
    p.add_argument("--widths", default="", help="comma-separated widths (default: mup.base_dim x 1/4, 1/2, 1, 2)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per width (default 4)")
    p.add_argument("--seeds", type=int, default=3, help="initialisations averaged per width (default 3)")
    p.add_argument("--lr", type=float, default=0.0, help="constant AdamW lr (default: optimizer.lr)")
    p.add_argument("--out", default="", help="PNG path (default <run_dir>/mup_check.png); a .json is written beside it")


def _widths(text: str, base_dim: int) -> list[int]:
    if not text:
        return [base_dim // 4, base_dim // 2, base_dim, base_dim * 2]
    try:
        widths = sorted({int(w) for w in text.split(",")})
    except ValueError:
        raise UserError(f"mup-check: --widths must be comma-separated integers, got {text!r}") from None
    if len(widths) < 2 or widths[0] < 1:
        raise UserError(f"mup-check: --widths needs at least two positive widths, got {text!r}")
    return widths


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    """Run the coordinate check for a recipe and write the plot and numbers."""
    from data import TokenLoader, TokenShard
    from trainer.config import JobConfig
    from trainer.train import prepare_data_or_fail

    cfg = JobConfig.load(args.config, overrides)
    if args.steps < 1 or args.seeds < 1:
        raise UserError(f"mup-check: --steps and --seeds must be at least 1, got {args.steps} and {args.seeds}")
    widths = _widths(args.widths, cfg.mup.base_dim)
    lr = args.lr or cfg.optimizer.lr
    prepared = prepare_data_or_fail(cfg.data, log=print)
    loader = TokenLoader(TokenShard(prepared.train_path), seq_len=cfg.training.seq_len,
                         global_batch_size=cfg.training.global_batch_size, rank=0, world_size=1, shuffle_seed=cfg.run.seed)
    batches = [loader.next_batch() for _ in range(args.steps)]
    seeds = [cfg.run.seed + i for i in range(args.seeds)]
    result = coord_check(cfg, batches, prepared.vocab_size, widths, lr, seeds)
    out = Path(args.out) if args.out else cfg.run.run_dir / "mup_check.png"
    plot(result, out, f"coordinate check: {cfg.model.name}, widths {widths}, AdamW lr {lr:g}, base {cfg.mup.base_dim}")
    out.with_suffix(".json").write_text(json.dumps(dataclasses.asdict(result), indent=1))
    print(f"wren: coordinate check over widths {widths}, {args.steps} steps at lr {lr:g}, {args.seeds} seeds: {out}")
    for parametrisation in PARAMETRISATIONS:
        slope = result.max_hidden_slope(parametrisation)
        verdict = "flat" if slope < FLAT_SLOPE else "NOT flat"
        print(f"  {parametrisation:9s} steepest hidden growth exponent at step {args.steps}: {slope:.3f} ({verdict})")
    return 0
