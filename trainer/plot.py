"""Loss curves of a run, drawn from its metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from trainer.metrics import read_metrics


def plot_losses(run_dir: Path, out: Path | None = None) -> Path:
    """Draw train and eval loss against step into `<run_dir>/loss.png` (or `out`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    evals = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval (held out)", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"wren: {Path(run_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out) if out is not None else Path(run_dir) / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out
