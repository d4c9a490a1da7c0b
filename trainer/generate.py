"""`wren generate RUN --prompt TEXT`: sample text from a run's latest (or chosen) checkpoint.

The model and the run's tokenizer are loaded as `wren export-hf` loads them
(`trainer.export_hf.load_model_from_run`). The prompt is encoded after an EOS token (documents
follow an EOS in wren's token streams, so this is what a document start looks like in
training), read once through the model (prefill), and then one token at a time is sampled and
fed back, until `--max-new-tokens` or an EOS.

The generation interface, which every model that `wren generate` runs implements:

    model.make_cache(batch_size: int, max_seq_len: int) -> cache
        An empty cache for up to `max_seq_len` positions (the model's own `max_seq_len` at most;
        a ValueError beyond it). The cache has an int attribute `seq_len` (tokens consumed so
        far, 0 when empty) and a method `nbytes() -> int` (bytes of context state it holds).
    model.forward_cached(tokens: Tensor (B, t) int64, cache) -> logits Tensor (B, t, V)
        The logits of `tokens` as continuations of the cached context: equal, up to float
        rounding, to the last t rows of `model(context + tokens)`. Updates the cache in place
        (appends keys and values, or advances the recurrent state) and adds t to `cache.seq_len`.
        Any t >= 1 is allowed, so a prompt is one call and each sampled token another.

Softmax models keep a KV cache whose `nbytes()` grows linearly with the context (Llama's
`KVCache`); linear-attention models keep a recurrent state whose `nbytes()` stops growing once
their sliding windows are full (BASED's `BasedCache`, Lizard's cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from trainer.errors import UserError

__all__ = ["GenerationCache", "GenerativeModel", "add_arguments", "generate", "run", "sample_next"]


class GenerationCache(Protocol):
    """What `make_cache` returns (see the module docstring)."""

    seq_len: int

    def nbytes(self) -> int:
        """Bytes of context state held."""


class GenerativeModel(Protocol):
    """A model that `wren generate` can run (see the module docstring)."""

    def make_cache(self, batch_size: int, max_seq_len: int) -> GenerationCache:
        """An empty cache."""

    def forward_cached(self, tokens: Tensor, cache: GenerationCache) -> Tensor:
        """Logits of `tokens` continuing the cached context; updates the cache."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    p.add_argument("run", help="run directory (with config.toml, tokenizer.model and checkpoints/)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to sample (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument(
        "--attention", default=None,
        help="override the model's attention kind, e.g. 'hyper' on a Llama trained with softmax",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def sample_next(logits: Tensor, *, temperature: float, top_k: int, generator: torch.Generator) -> Tensor:
    """One token id per row of `logits` (B, V): greedy at temperature 0, else top-k sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(
    model: Any,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
) -> list[int]:
    """Sampled continuation ids of `prompt_ids` (at most `max_new_tokens`, ending at `stop_id`)."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    cache = model.make_cache(1, len(prompt_ids) + max_new_tokens)
    logits = model.forward_cached(torch.tensor([prompt_ids], device=device), cache)[:, -1]
    new_ids: list[int] = []
    for index in range(max_new_tokens):
        token = sample_next(logits, temperature=temperature, top_k=top_k, generator=generator)
        new_ids.append(int(token[0]))
        if new_ids[-1] == stop_id or index == max_new_tokens - 1:
            break
        logits = model.forward_cached(token.view(1, 1), cache)[:, -1]
    return new_ids


def _with_attention(model: Any, kind: str) -> Any:
    """The same weights under another attention kind (a model config field `attention`)."""
    config = model.config
    if not any(f.name == "attention" for f in dataclasses.fields(config)):
        raise UserError(f"--attention: model {type(model).__name__} has no attention kind to choose")
    try:
        other = type(model)(dataclasses.replace(config, attention=kind))
    except ValueError as err:
        raise UserError(f"--attention: {err}") from None
    other.load_state_dict(model.state_dict())
    return other


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """Load the run, sample, print prompt + continuation; returns the exit code."""
    from data import Tokenizer
    from trainer.export_hf import load_model_from_run

    if extra:
        raise UserError(f"generate: unknown arguments {' '.join(extra)}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0 or args.top_k < 0:
        raise UserError(f"--temperature and --top-k: must be >= 0, got {args.temperature} and {args.top_k}")
    model, _, checkpoint = load_model_from_run(args.run, args.step)
    if not hasattr(model, "make_cache") or not hasattr(model, "forward_cached"):
        raise UserError(f"generate: model {type(model).__name__} does not implement make_cache/forward_cached")
    if args.attention is not None:
        model = _with_attention(model, args.attention)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    tokenizer = Tokenizer.load(Path(args.run) / "tokenizer.model")
    prompt_ids = [tokenizer.eos_id, *tokenizer.encode(args.prompt)]
    limit = model.config.max_seq_len
    if len(prompt_ids) + args.max_new_tokens > limit:
        raise UserError(
            f"--max-new-tokens: prompt ({len(prompt_ids)} tokens) + {args.max_new_tokens} new tokens exceed "
            f"the model's max_seq_len {limit}"
        )
    new_ids = generate(
        model, prompt_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        generator=torch.Generator().manual_seed(args.seed), stop_id=tokenizer.eos_id,
    )
    print(tokenizer.decode(prompt_ids[1:] + new_ids), flush=True)
    print(f"wren: {len(new_ids)} tokens from {checkpoint}", file=sys.stderr, flush=True)
    return 0
