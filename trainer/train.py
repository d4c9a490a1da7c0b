"""The training loop: data, model, optimizer and checkpoints wired from one `JobConfig`.

Order of construction follows DESIGN.md: data (tokenizer and shards, cached), model (registry,
seeded init, then the model's `parallelize`: activation checkpointing, then FSDP2), optimizer and
schedule, loader from a global token cursor, then resume from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

from data import (
    DataConfig,
    PreparedData,
    TokenLoader,
    TokenShard,
    eval_windows,
    prepare_data,
)
from data.chat import ChatTokenizer, PreparedChat, prepare_chat
from models import get_model_spec
from optim.builder import build_optimizer
from optim.lowrank import factorised_flops_per_token
from optim.schedules import build_schedule
from trainer.checkpoint import Checkpointer, CheckpointError
from trainer.config import JobConfig
from trainer.distributed import DistEnv
from trainer.errors import ConfigError, NonFiniteError, UserError
from trainer.extensions import BuildContext, apply_model_transforms
from trainer.finetune_build import (
    build_finetune_model,
    pretrained_model_config,
    pretrained_source,
    tokenizer_for,
    trainable_summary,
)
from trainer.metrics import (
    MetricsLogger,
    optimizer_state_bytes,
    parameter_bytes,
    peak_memory_bytes,
    read_metrics,
)
from trainer.peak_flops import peak_flops_per_s
from trainer.train_state import (
    IntState,
    ModelOptimizerState,
    Progress,
    RNGState,
    all_finite,
)

CONFIG_FILE = "config.toml"
TOKENIZER_FILE = "tokenizer.model"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # preemption notices (SLURM, Kubernetes, Ray)
IGNORE_INDEX = -100  # targets the loss skips (F.cross_entropy's default ignore_index)


@dataclass
class StepResult:
    """What one optimizer step produced (loss and grad norm are global means over ranks)."""

    loss: float
    grad_norm: float
    lr: float
    skipped: bool


@dataclass
class TrainResult:
    """Where a finished run left its outputs and how it ended."""

    run_dir: Path
    checkpoint: Path
    final_train_loss: float
    final_eval_loss: float
    plot: Path | None
    preempted: bool = False  # stopped early by a signal, after checkpointing; rerun to resume


def next_token_targets(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Targets `tokens[:, 1:]`, IGNORE_INDEX where the response mask is 0 (prompt and template tokens)."""
    return tokens[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)


def prepare_data_or_fail(cfg: DataConfig, log) -> PreparedData:
    """`prepare_data`, reporting unusable inputs (empty corpus, unreadable files) as a user error."""
    try:
        return prepare_data(cfg, log=log)
    except ValueError as err:
        raise UserError(f"data: {err}") from None


class Trainer:
    """Builds every component of a run from its config and trains it to `training.steps`."""

    def __init__(self, cfg: JobConfig, env: DistEnv):
        self.cfg = cfg
        self.env = env
        self.run_dir = cfg.run.run_dir
        self.log = print if env.is_main else (lambda *args, **kwargs: None)
        self.dtype = getattr(torch, cfg.training.dtype)
        self.local_batch_size = cfg.training.local_batch_size(env.world_size)

        self.source = pretrained_source(cfg) if cfg.finetune.enabled else None
        prepared = self._prepare_data()
        torch.manual_seed(cfg.run.seed)
        spec = get_model_spec(cfg.model.name)
        self.extensions = BuildContext(cfg=cfg, env=env, log=self.log)
        if cfg.training.activation_checkpointing:
            self.log("wren: activation checkpointing on every transformer block")
        if env.mesh is not None:
            self.log(f"wren: FSDP2 fully_shard over {env.world_size} ranks ({env.device.type})")
        if self.source is None:
            self.model_config = cfg.model.build_model_config(prepared.vocab_size)
            with torch.device(env.device):
                model = spec.model_cls(self.model_config)  # seeded init, identical on every rank
            model = apply_model_transforms(model, self.extensions)
            self.model = spec.parallelize(
                model, env.mesh, activation_checkpointing=cfg.training.activation_checkpointing
            )
        else:
            self.model_config = self._pretrained_model_config(prepared.vocab_size)
            self.model = build_finetune_model(cfg, env, self.extensions, spec, self.source, self.model_config)
        # the FLOPs of the model as trained: a factorised weight costs r (m + n) per token, not m n
        self.flops_per_token = factorised_flops_per_token(self.model, self.model.flops_per_token(cfg.training.seq_len))
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.extensions.model = self.model
        self.optimizer = build_optimizer(cfg.optimizer, self.model, self.extensions.lr_scales)
        self.extensions.optimizer = self.optimizer
        self.tokens_per_step = cfg.training.global_batch_size * cfg.training.seq_len
        self.schedule = build_schedule(
            cfg.schedule,
            peak_lr=cfg.optimizer.lr,
            total_steps=cfg.training.steps,
            tokens_per_step=self.tokens_per_step,
            seq_len=cfg.training.seq_len,
        )
        chat = isinstance(prepared, PreparedChat)
        self.loader = TokenLoader(
            TokenShard(prepared.train_path),
            seq_len=cfg.training.seq_len,
            global_batch_size=cfg.training.global_batch_size,
            rank=env.rank,
            world_size=env.world_size,
            shuffle_seed=cfg.run.seed,
            mask_shard=TokenShard(prepared.train_mask_path) if chat else None,
        )
        self.val_shard = TokenShard(prepared.val_path)
        self.val_mask = TokenShard(prepared.val_mask_path) if chat else None
        try:  # checks now, not at the first evaluation, that the held-out split holds a batch
            eval_windows(self.val_shard, **self._eval_args())
        except ValueError as err:
            raise UserError(f"eval: {err} (lower eval.batch_size or raise data.val_fraction)") from None
        self.progress = Progress()
        self.consecutive_nonfinite = 0
        self.stop_signal: int | None = None
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last, env=env)
        shape = f"{cfg.model.name}/{cfg.model.flavor}" if self.source is None else f"{cfg.model.name} from {self.source.path}"
        self.log(
            f"wren: model {shape}: {self.num_params / 1e6:.2f}M parameters, "
            f"{self.flops_per_token / 1e6:.1f} MFLOP/token; world size {env.world_size}; dtype {cfg.training.dtype}"
        )
        if self.source is not None:
            trainable, total = trainable_summary(self.model)
            self.log(
                f"wren: fine-tuning ({cfg.finetune.method}): {trainable:,} trainable of {total:,} parameters "
                f"({trainable / total:.2%}); {parameter_bytes(self.model) / 2**20:.1f} MiB of parameters on this rank; "
                f"peak memory so far {peak_memory_bytes(env.device) / 2**30:.2f} GiB"
            )

    def _data_config(self) -> DataConfig:
        """`[data]`, tokenised with the pretrained checkpoint's tokenizer when fine-tuning."""
        if self.source is None:
            return self.cfg.data
        tokenizer = tokenizer_for(self.cfg, self.source)
        if tokenizer is None:
            raise ConfigError(
                f"finetune.init_from: {self.source.path} has no sentencepiece tokenizer.model for [data]; "
                f"set data.tokenizer_path"
            )
        return dataclasses.replace(self.cfg.data, tokenizer_path=str(tokenizer))

    def _prepare_chat(self, log) -> PreparedChat:
        """Chat data tokenised with the checkpoint's tokenizer (a Hugging Face directory's own, with its template)."""
        cfg = self.cfg
        try:
            if self.source.kind == "hf":
                tokenizer = ChatTokenizer.from_hf(self.source.path)
            else:
                tokenizer = ChatTokenizer.from_sentencepiece(tokenizer_for(cfg, self.source))
            return prepare_chat(cfg.finetune.chat, tokenizer, cfg.data.cache_dir, log=log)
        except (OSError, ValueError) as err:
            raise UserError(f"finetune.chat: {err}") from None

    def _prepare_data(self) -> PreparedData | PreparedChat:
        """Build (rank 0 first) or reuse the cached tokenizer and shards; copy the tokenizer to the run."""
        if self.cfg.finetune.chat.paths:
            prepare = self._prepare_chat
        else:
            prepare = functools.partial(prepare_data_or_fail, self._data_config())
        if self.env.is_main:
            prepared = prepare(log=self.log)
        self.env.barrier()
        if not self.env.is_main:
            prepared = prepare(log=lambda *_: None)
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tokenizer = getattr(prepared, "tokenizer_path", None) or tokenizer_for(self.cfg, self.source)
            if tokenizer is not None:
                shutil.copyfile(tokenizer, self.run_dir / TOKENIZER_FILE)
            (self.run_dir / CONFIG_FILE).write_text(self.cfg.to_toml())
        return prepared

    def _pretrained_model_config(self, vocab_size: int):
        """The pretrained architecture; its vocabulary must cover the data's tokenizer and its context seq_len."""
        model_config = pretrained_model_config(self.source)
        if vocab_size > model_config.vocab_size:
            raise ConfigError(
                f"finetune.init_from: the data's tokenizer has {vocab_size} ids, more than the model's "
                f"vocab_size {model_config.vocab_size}"
            )
        if self.cfg.training.seq_len > model_config.max_seq_len:
            raise ConfigError(
                f"training.seq_len: {self.cfg.training.seq_len} exceeds the pretrained model's max_seq_len {model_config.max_seq_len}"
            )
        return model_config

    def _eval_args(self) -> dict:
        return {
            "seq_len": self.cfg.training.seq_len,
            "batch_size": self.cfg.eval.batch_size,
            "max_batches": self.cfg.eval.batches,
            "rank": self.env.rank,
            "world_size": self.env.world_size,
            "mask_shard": self.val_mask,
        }

    def checkpoint_state(self) -> dict:
        """The Stateful parts that make a resume exact."""
        state = {
            "model_optim": ModelOptimizerState(self.model, self.optimizer),
            "loader": IntState(self.loader),
            "progress": IntState(self.progress),
            "rng": RNGState(),
            **self.extensions.checkpoint_state,
        }
        if self.schedule.state_dict():
            state["schedule"] = self.schedule
        return state

    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.dtype)

    def _forward_backward(self, batch: torch.Tensor) -> float:
        """Accumulate gradients of the mean next-token loss over the micro-batches; returns the global mean."""
        micro = self.cfg.training.micro_batch_size or self.local_batch_size
        chunks = batch.to(self.env.device, non_blocking=True).split(micro)
        loss_sum = torch.zeros((), device=self.env.device)
        for index, chunk in enumerate(chunks):
            if isinstance(self.model, FSDPModule):
                self.model.set_requires_gradient_sync(index == len(chunks) - 1)
            with self._autocast():
                logits = self.model(chunk[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten())
            (loss / len(chunks)).backward()
            loss_sum += loss.detach()
        (loss_total,) = self.env.all_reduce_sum([loss_sum.item() / len(chunks)])
        return loss_total / self.env.world_size

    def _masked_forward_backward(self, tokens: torch.Tensor, mask: torch.Tensor) -> float:
        """As `_forward_backward`, the loss averaged over the global batch's response targets only.

        Each rank scales its summed loss by world_size / (global target count), so that FSDP2's
        gradient mean over ranks is the gradient of the global mean, at any world size.
        """
        micro = self.cfg.training.micro_batch_size or self.local_batch_size
        targets = next_token_targets(tokens, mask).to(self.env.device, non_blocking=True)
        tokens = tokens.to(self.env.device, non_blocking=True)
        (count,) = self.env.all_reduce_sum([float((targets != IGNORE_INDEX).sum())])
        count = max(count, 1.0)
        chunks = list(zip(tokens.split(micro), targets.split(micro)))
        loss_sum = 0.0
        for index, (chunk, chunk_targets) in enumerate(chunks):
            if isinstance(self.model, FSDPModule):
                self.model.set_requires_gradient_sync(index == len(chunks) - 1)
            with self._autocast():
                logits = self.model(chunk[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), chunk_targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            (loss * (self.env.world_size / count)).backward()
            loss_sum += loss.item()
        (loss_total,) = self.env.all_reduce_sum([loss_sum])
        return loss_total / count

    def train_step(self, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> StepResult:
        """Forward and backward over the micro-batches of `batch` (tokens, or tokens and a response mask), then clip and step (or skip)."""
        loss_mean = self._masked_forward_backward(*batch) if isinstance(batch, tuple) else self._forward_backward(batch)
        max_norm = self.cfg.training.grad_clip_norm or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm = grad_norm.item()
        step = self.progress.step
        lr = self.schedule.lr(step, tokens_seen=step * self.tokens_per_step)
        finite = math.isfinite(loss_mean) and math.isfinite(grad_norm)
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            self.optimizer.step()
            self.consecutive_nonfinite = 0
        else:
            self.progress.skipped_steps += 1
            self.consecutive_nonfinite += 1
            self.log(f"wren: step {step + 1}: non-finite loss {loss_mean} or grad norm {grad_norm}; update skipped")
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        if finite:
            for hook in self.extensions.step_hooks:
                hook(self.progress.step)
        if self.consecutive_nonfinite >= self.cfg.training.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"{self.consecutive_nonfinite} consecutive steps had a non-finite loss or gradient "
                f"(last at step {self.progress.step}); halting. Lower optimizer.lr, enable "
                f"training.grad_clip_norm or check the data; the last checkpoint is still valid."
            )
        return StepResult(loss=loss_mean, grad_norm=grad_norm, lr=lr, skipped=not finite)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the first `eval.batches` batches of the held-out split."""
        self.model.eval()
        loss_sum, count = 0.0, 0
        for batch in eval_windows(self.val_shard, **self._eval_args()):
            tokens, targets = (batch[0], next_token_targets(*batch)) if isinstance(batch, tuple) else (batch, batch[:, 1:])
            tokens, targets = tokens.to(self.env.device), targets.to(self.env.device)
            with self._autocast():
                logits = self.model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            loss_sum += loss.item()
            count += int((targets != IGNORE_INDEX).sum())
        self.model.train()
        loss_sum, count = self.env.all_reduce_sum([loss_sum, count])
        return loss_sum / max(1, count)

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step, refusing to save non-finite weights."""
        (finite_ranks,) = self.env.all_reduce_sum([float(all_finite(self.model))])
        if finite_ranks < self.env.world_size:
            raise NonFiniteError(f"weights are non-finite at step {self.progress.step}; not checkpointing them")
        path = self.checkpointer.save(self.progress.step, self.checkpoint_state())
        self.log(f"wren: checkpoint saved: {path}")
        return path

    def resume(self) -> None:
        """Continue from the latest checkpoint when there is one and resuming is on."""
        latest = self.checkpointer.latest() if self.cfg.checkpoint.resume else None
        if latest is None and self.cfg.schedule.decay_from:
            latest = Path(self.cfg.schedule.decay_from)  # branch from another run's checkpoint
        if latest is None:
            return
        try:
            self.checkpointer.load(latest, self.checkpoint_state())
        except ValueError as err:
            raise CheckpointError(f"cannot resume from '{latest}': {err}") from None
        self.log(f"wren: resumed from {latest} at step {self.progress.step}")

    def fit(self) -> TrainResult:
        """Train to `training.steps`, logging, evaluating and checkpointing on the way."""
        cfg = self.cfg
        self.resume()
        total = cfg.training.steps
        if self.progress.step >= total:
            return self._already_finished()
        metrics = MetricsLogger(
            self.run_dir, cfg.metrics, total_steps=total, enabled=self.env.is_main, resume_step=self.progress.step
        )
        peak = cfg.metrics.peak_flops_per_s or peak_flops_per_s(self.dtype, self.env.device)
        previous_handlers = self._install_stop_handlers()
        tokens_per_step = cfg.training.global_batch_size * cfg.training.seq_len
        last_checkpoint = self.checkpointer.latest()
        result = StepResult(loss=math.nan, grad_norm=math.nan, lr=0.0, skipped=False)
        interval_start, interval_steps = time.perf_counter(), 0
        first_step = self.progress.step + 1
        self.model.train()
        try:
            while self.progress.step < total:
                result = self.train_step(self.loader.next_batch())
                step, interval_steps = self.progress.step, interval_steps + 1
                if step == first_step and self.source is not None:
                    self._log_memory()
                record = {
                    "train/loss": result.loss,
                    "train/lr": result.lr,
                    "train/grad_norm": result.grad_norm,
                    "train/skipped": int(result.skipped),
                    "data/tokens_consumed": self.loader.tokens_consumed,
                }
                if step % cfg.metrics.log_every_steps == 0 or step == total:
                    elapsed = time.perf_counter() - interval_start
                    tokens_per_s = interval_steps * tokens_per_step / elapsed
                    record["perf/tokens_per_s"] = tokens_per_s
                    mfu = self.flops_per_token * tokens_per_s / (peak * self.env.world_size)
                    if mfu > 1 and not cfg.metrics.peak_flops_per_s:
                        peak = peak_flops_per_s(self.dtype, self.env.device, remeasure=True)
                        self.log(f"wren: the cached matmul peak was too low (MFU {mfu:.0%}); re-measured: {peak / 1e9:.1f} GFLOP/s")
                        mfu = self.flops_per_token * tokens_per_s / (peak * self.env.world_size)
                    record["perf/mfu"] = mfu
                    record["perf/peak_memory_gib"] = peak_memory_bytes(self.env.device) / 2**30
                    record["memory/param_bytes"] = parameter_bytes(self.model)
                    record["memory/optimizer_state_bytes"] = optimizer_state_bytes(self.optimizer)
                    metrics.console(step, record)
                    interval_start, interval_steps = time.perf_counter(), 0
                metrics.log(step, record)
                pause = time.perf_counter()
                if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < total:
                    metrics.log(step, {"eval/loss": self.evaluate()})
                if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < total:
                    last_checkpoint = self.save_checkpoint()
                if self._stop_requested() and step < total:
                    return self._stop_for_preemption(last_checkpoint)
                interval_start += time.perf_counter() - pause
            eval_loss = self.evaluate()
            metrics.log(total, {"eval/loss": eval_loss})
            if last_checkpoint is None or last_checkpoint.name != f"step_{total:08d}":
                last_checkpoint = self.save_checkpoint()
        finally:
            metrics.close()
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
        return self._finish(last_checkpoint, result.loss, eval_loss)

    def _log_memory(self) -> None:
        """After the first step (optimizer state exists from then on): what fine-tuning costs per rank."""
        self.log(
            f"wren: memory per rank after the first step: parameters {parameter_bytes(self.model) / 2**20:.1f} MiB, "
            f"optimizer state {optimizer_state_bytes(self.optimizer) / 2**20:.2f} MiB, "
            f"peak {peak_memory_bytes(self.env.device) / 2**30:.2f} GiB"
        )

    def _already_finished(self) -> TrainResult:
        """A rerun of a complete run: report its recorded final losses instead of training or logging again."""
        records = read_metrics(self.run_dir)
        train = [r["train/loss"] for r in records if "train/loss" in r]
        evals = [r["eval/loss"] for r in records if "eval/loss" in r]
        self.log(f"wren: run already complete at step {self.progress.step} (training.steps = {self.cfg.training.steps}); "
                 f"raise training.steps to train further")
        return self._finish(self.checkpointer.latest(), train[-1] if train else math.nan, evals[-1] if evals else math.nan)

    def _install_stop_handlers(self) -> dict:
        """On SIGTERM / SIGUSR1, finish the current step, checkpoint and exit (see `_stop_requested`).

        Returns the handlers it replaced, which `fit` puts back when it returns.

        Signal handlers can only be set from the main thread; elsewhere (a Ray worker's training
        thread) the scheduler's own stop mechanism applies.
        """
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum, frame):
            self.stop_signal = signum

        return {signum: signal.signal(signum, request_stop) for signum in STOP_SIGNALS}

    def _stop_requested(self) -> bool:
        """Whether any rank received a stop signal (all ranks agree, so all stop at the same step)."""
        (ranks_stopping,) = self.env.all_reduce_sum([float(self.stop_signal is not None)])
        return ranks_stopping > 0

    def _stop_for_preemption(self, last_checkpoint: Path | None) -> TrainResult:
        """Checkpoint the step just taken (unless it was just saved) and return without finishing."""
        step = self.progress.step
        if last_checkpoint is None or last_checkpoint.name != f"step_{step:08d}":
            last_checkpoint = self.save_checkpoint()
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "a stop signal on another rank"
        self.log(f"wren: stopped by {name} after step {step}; checkpoint {last_checkpoint}. Run the same command to resume.")
        self.env.barrier()
        return TrainResult(self.run_dir, last_checkpoint, math.nan, math.nan, None, preempted=True)

    def _finish(self, checkpoint: Path, train_loss: float, eval_loss: float) -> TrainResult:
        plot = None
        if self.env.is_main:
            if self.cfg.metrics.plot and self.cfg.metrics.jsonl:
                from trainer.plot import plot_losses

                plot = plot_losses(self.run_dir)
            if self.cfg.checkpoint.export_hf:
                from trainer.export_hf import export_hf

                self.log(f"wren: Hugging Face export: {export_hf(self.run_dir, self.run_dir / 'hf')}")
            self.log(f"wren: done. checkpoint: {checkpoint}")
            self.log(f"wren: final train loss {train_loss:.4f}, eval loss {eval_loss:.4f}")
            if plot is not None:
                self.log(f"wren: loss curve: {plot}")
        self.env.barrier()
        return TrainResult(self.run_dir, checkpoint, train_loss, eval_loss, plot)
