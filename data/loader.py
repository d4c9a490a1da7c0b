"""Resumable, world-size-independent batches of token windows from a shard.

The shard's tokens form one stream cut into windows: window k (k = 0, 1, 2, ...) is
`tokens[s : s + seq_len + 1]` with `s = (k mod W) * seq_len` and `W = (num_tokens - 1) // seq_len`,
so consecutive windows share one token (the last target of one is the first input of the next),
and k >= W wraps around into the next epoch. With a `shuffle_seed`, epoch e visits the W windows
in the order of a permutation drawn from (shuffle_seed, e) instead, so a batch mixes windows from
all over the corpus rather than from one document; the permutation depends only on the seed and
the epoch, never on the world size, so everything below holds unchanged. A training step takes the `global_batch_size`
windows following the global cursor; rank r of `world_size` takes its contiguous slice of them.
The cursor counts tokens, not per-rank batches, so the concatenation over ranks equals the
single-process batch, and a run saved at one world size resumes at another without skipping or
repeating a window.

With a `mask_shard` (chat data, `data.chat`: one 0/1 entry per token, 1 on response tokens) a
batch is the pair (tokens, mask) of windows at the same positions; without one, the tokens alone.
"""

from collections.abc import Iterator

import numpy as np
import torch

from data.shards import TokenShard


def _local_batch_size(global_batch_size: int, rank: int, world_size: int) -> int:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank: {rank} is not in [0, world_size={world_size})")
    if global_batch_size < 1 or global_batch_size % world_size:
        raise ValueError(
            f"global_batch_size: {global_batch_size} must be a positive multiple of "
            f"world_size {world_size}"
        )
    return global_batch_size // world_size


def _num_windows(shard: TokenShard, seq_len: int) -> int:
    """W: how many windows of `seq_len + 1` tokens, `seq_len` apart, fit in the shard."""
    if seq_len < 1:
        raise ValueError(f"seq_len: must be positive, got {seq_len}")
    if shard.num_tokens < seq_len + 1:
        raise ValueError(
            f"{shard.path}: {shard.num_tokens} tokens, fewer than one window of "
            f"seq_len + 1 = {seq_len + 1}"
        )
    return (shard.num_tokens - 1) // seq_len


def _checked_mask(shard: TokenShard, mask_shard: TokenShard | None) -> TokenShard | None:
    """`mask_shard`, checked to hold one entry per token of `shard`."""
    if mask_shard is not None and mask_shard.num_tokens != shard.num_tokens:
        raise ValueError(f"{mask_shard.path}: {mask_shard.num_tokens} mask entries for {shard.num_tokens} tokens")
    return mask_shard


def _windows(shard: TokenShard, window_indices: np.ndarray, seq_len: int) -> torch.Tensor:
    """Gather windows `tokens[k * seq_len : k * seq_len + seq_len + 1]` as an int64 tensor."""
    positions = window_indices[:, None] * seq_len + np.arange(seq_len + 1)
    return torch.from_numpy(shard.tokens[positions].astype(np.int64))


class TokenLoader:
    """Serves (local_batch, seq_len + 1) int64 windows from one shard; a global cursor in tokens.

    `tokens_consumed` is global (the same on every rank) and advances by
    `global_batch_size * seq_len` per `next_batch`. Inputs are `batch[:, :-1]`, targets
    `batch[:, 1:]`.
    """

    def __init__(
        self,
        shard: TokenShard,
        *,
        seq_len: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_seed: int | None = None,
        mask_shard: TokenShard | None = None,
    ) -> None:
        self.shard = shard
        self.mask_shard = _checked_mask(shard, mask_shard)
        self.shuffle_seed = shuffle_seed
        self._permutation: tuple[int, np.ndarray] | None = None  # (epoch, its window order)
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = _local_batch_size(global_batch_size, rank, world_size)
        self.num_windows = _num_windows(shard, seq_len)
        self.tokens_consumed = 0

    def next_batch(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """This rank's windows of the next global batch, shape (local_batch, seq_len + 1) (and their mask)."""
        first_window = self.tokens_consumed // self.seq_len + self.rank * self.local_batch_size
        window_indices = np.arange(first_window, first_window + self.local_batch_size)
        self.tokens_consumed += self.global_batch_size * self.seq_len
        positions = self._positions(window_indices)
        tokens = _windows(self.shard, positions, self.seq_len)
        if self.mask_shard is None:
            return tokens
        return tokens, _windows(self.mask_shard, positions, self.seq_len)

    def _positions(self, window_indices: np.ndarray) -> np.ndarray:
        """Where in the shard global windows `window_indices` start (in units of seq_len)."""
        positions = window_indices % self.num_windows
        if self.shuffle_seed is None:
            return positions
        epochs = window_indices // self.num_windows
        for epoch in np.unique(epochs):
            positions[epochs == epoch] = self._epoch_order(int(epoch))[positions[epochs == epoch]]
        return positions

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The seeded permutation of window positions for `epoch` (the latest one is cached)."""
        if self._permutation is None or self._permutation[0] != epoch:
            rng = np.random.default_rng([self.shuffle_seed, epoch])
            self._permutation = (epoch, rng.permutation(self.num_windows))
        return self._permutation[1]

    @property
    def epoch(self) -> float:
        """Passes over the shard so far (fractional)."""
        return self.tokens_consumed / (self.num_windows * self.seq_len)

    def state_dict(self) -> dict[str, int]:
        """The global cursor, plus `seq_len` to check on load."""
        return {"tokens_consumed": self.tokens_consumed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from `state_dict()` output, saved at any world size and global batch size."""
        if state["seq_len"] != self.seq_len:
            raise ValueError(
                f"seq_len: the loader state was saved with seq_len {state['seq_len']}, "
                f"this loader uses {self.seq_len}"
            )
        tokens_consumed = int(state["tokens_consumed"])
        if tokens_consumed < 0 or tokens_consumed % self.seq_len:
            raise ValueError(
                f"tokens_consumed: {tokens_consumed} is not a non-negative multiple of "
                f"seq_len {self.seq_len}"
            )
        self.tokens_consumed = tokens_consumed


def eval_windows(
    shard: TokenShard,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    rank: int = 0,
    world_size: int = 1,
    mask_shard: TokenShard | None = None,
) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic, non-overlapping evaluation batches from the start of `shard`.

    Global batch j holds windows `j * batch_size .. (j + 1) * batch_size - 1` (windows as in
    `TokenLoader`, without wrapping); rank r gets its contiguous slice, shape
    (batch_size // world_size, seq_len + 1). Yields `min(max_batches, W // batch_size)` batches,
    only whole ones, so every rank yields the same number. Arguments are checked at the call,
    not at the first batch. With `mask_shard`, each batch is the pair (tokens, mask).
    """
    mask_shard = _checked_mask(shard, mask_shard)
    local_batch_size = _local_batch_size(batch_size, rank, world_size)
    if max_batches < 1:
        raise ValueError(f"max_batches: must be positive, got {max_batches}")
    num_windows = _num_windows(shard, seq_len)
    if num_windows < batch_size:
        raise ValueError(
            f"{shard.path}: {shard.num_tokens} tokens make {num_windows} windows of seq_len "
            f"{seq_len}, fewer than one evaluation batch of {batch_size}"
        )
    first_windows = (
        batch_index * batch_size + rank * local_batch_size
        for batch_index in range(min(max_batches, num_windows // batch_size))
    )
    windows = (np.arange(first, first + local_batch_size) for first in first_windows)
    if mask_shard is None:
        return (_windows(shard, indices, seq_len) for indices in windows)
    return ((_windows(shard, indices, seq_len), _windows(mask_shard, indices, seq_len)) for indices in windows)
