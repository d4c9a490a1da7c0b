"""TokenLoader and eval_windows: window layout, rank splitting, resuming across world sizes."""

import numpy as np
import pytest
import torch

from data.loader import TokenLoader, eval_windows
from data.shards import write_shard

NUM_TOKENS = 1000
SEQ_LEN = 16
NUM_WINDOWS = (NUM_TOKENS - 1) // SEQ_LEN  # 62 windows per epoch


@pytest.fixture
def shard(tmp_path):
    """Token i is the id i, so a window's contents say where in the stream it came from."""
    documents = np.split(np.arange(NUM_TOKENS), [100, 350, 351, 800])
    return write_shard(tmp_path / "shard", documents, NUM_TOKENS)


def loader(shard, *, global_batch_size=8, rank=0, world_size=1, seq_len=SEQ_LEN, shuffle_seed=None):
    return TokenLoader(
        shard,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        rank=rank,
        world_size=world_size,
        shuffle_seed=shuffle_seed,
    )


def global_step(loaders):
    """One step of every rank's loader, concatenated in rank order."""
    return torch.cat([ld.next_batch() for ld in loaders])


def window_starts(batch):
    return batch[:, 0].tolist()


def test_batches_are_contiguous_windows_covering_an_epoch_once(shard):
    single = loader(shard, global_batch_size=2)
    batches = [single.next_batch() for _ in range(NUM_WINDOWS // 2)]
    assert all(b.shape == (2, SEQ_LEN + 1) and b.dtype == torch.int64 for b in batches)
    rows = torch.cat(batches)
    # Every row is seq_len + 1 consecutive tokens of the stream ...
    assert torch.equal(rows - rows[:, :1], torch.arange(SEQ_LEN + 1).expand_as(rows))
    # ... and the inputs of one epoch are every position before the last window's end, once.
    inputs = rows[:, :-1].flatten()
    assert torch.equal(inputs, torch.arange(NUM_WINDOWS * SEQ_LEN))
    assert single.tokens_consumed == NUM_WINDOWS * SEQ_LEN


def test_wraps_around_into_the_next_epoch(shard):
    single = loader(shard, global_batch_size=4)
    starts = [s for _ in range(20) for s in window_starts(single.next_batch())]
    epoch = [k * SEQ_LEN for k in range(NUM_WINDOWS)]
    assert starts == (epoch + epoch)[:80]
    assert single.epoch == pytest.approx(80 / NUM_WINDOWS)


@pytest.mark.parametrize("shuffle_seed", [None, 7])
@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_ranks_concatenate_to_the_single_process_batch(shard, world_size, shuffle_seed):
    ranks = [loader(shard, rank=r, world_size=world_size, shuffle_seed=shuffle_seed) for r in range(world_size)]
    reference = loader(shard, shuffle_seed=shuffle_seed)
    for _ in range(10):  # through the wraparound
        local = [ld.next_batch() for ld in ranks]
        assert all(batch.shape == (8 // world_size, SEQ_LEN + 1) for batch in local)
        assert torch.equal(torch.cat(local), reference.next_batch())
    assert all(ld.tokens_consumed == reference.tokens_consumed for ld in ranks)


def test_resume_from_state_dict_continues_identically(shard):
    original = loader(shard)
    for _ in range(3):
        original.next_batch()
    resumed = loader(shard)
    resumed.load_state_dict(original.state_dict())
    for _ in range(12):  # through the wraparound
        assert torch.equal(resumed.next_batch(), original.next_batch())


@pytest.mark.parametrize("shuffle_seed", [None, 7])
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (4, 2)])
def test_resume_at_another_world_size_gives_the_same_stream(shard, before, after, shuffle_seed):
    reference = loader(shard, shuffle_seed=shuffle_seed)
    expected = [reference.next_batch() for _ in range(10)]

    first = [loader(shard, rank=r, world_size=before, shuffle_seed=shuffle_seed) for r in range(before)]
    stream = [global_step(first) for _ in range(4)]
    states = [ld.state_dict() for ld in first]
    assert all(state == states[0] for state in states)  # the cursor is global

    second = [loader(shard, rank=r, world_size=after, shuffle_seed=shuffle_seed) for r in range(after)]
    for ld in second:
        ld.load_state_dict(states[0])
    stream += [global_step(second) for _ in range(6)]

    for got, want in zip(stream, expected, strict=True):
        assert torch.equal(got, want)


def test_shuffled_epochs_visit_every_window_once_in_a_seeded_order(shard):
    shuffled = loader(shard, global_batch_size=2, shuffle_seed=3)
    epochs = [[s for _ in range(NUM_WINDOWS // 2) for s in window_starts(shuffled.next_batch())] for _ in range(2)]
    every_window = [k * SEQ_LEN for k in range(NUM_WINDOWS)]
    for starts in epochs:
        assert sorted(starts) == every_window
        assert starts != every_window
    assert epochs[0] != epochs[1]
    again = loader(shard, global_batch_size=2, shuffle_seed=3)
    assert [s for _ in range(NUM_WINDOWS // 2) for s in window_starts(again.next_batch())] == epochs[0]
    other = loader(shard, global_batch_size=2, shuffle_seed=4)
    assert [s for _ in range(NUM_WINDOWS // 2) for s in window_starts(other.next_batch())] != epochs[0]


def test_resume_with_another_global_batch_size_skips_and_repeats_nothing(shard):
    small = loader(shard, global_batch_size=2)
    starts = [s for _ in range(3) for s in window_starts(small.next_batch())]
    large = loader(shard, global_batch_size=6)
    large.load_state_dict(small.state_dict())
    starts += window_starts(large.next_batch())
    assert starts == [k * SEQ_LEN for k in range(12)]


def test_loader_errors(shard, tmp_path):
    with pytest.raises(ValueError, match="global_batch_size: 6 must be a positive multiple of"):
        loader(shard, global_batch_size=6, world_size=4)
    with pytest.raises(ValueError, match="rank: 2 is not in"):
        loader(shard, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than one window"):
        loader(shard, seq_len=NUM_TOKENS)
    with pytest.raises(ValueError, match="seq_len: the loader state was saved with seq_len 16"):
        loader(shard, seq_len=8).load_state_dict(loader(shard).state_dict())


def test_eval_windows_are_non_overlapping_from_the_start(shard):
    batches = list(eval_windows(shard, seq_len=SEQ_LEN, batch_size=4, max_batches=3))
    assert len(batches) == 3
    starts = [s for b in batches for s in window_starts(b)]
    assert starts == [k * SEQ_LEN for k in range(12)]
    again = list(eval_windows(shard, seq_len=SEQ_LEN, batch_size=4, max_batches=3))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


def test_eval_windows_stop_at_the_last_whole_batch_and_split_across_ranks(shard):
    single = list(eval_windows(shard, seq_len=SEQ_LEN, batch_size=8, max_batches=100))
    assert len(single) == NUM_WINDOWS // 8
    ranks = [
        list(
            eval_windows(
                shard, seq_len=SEQ_LEN, batch_size=8, max_batches=100, rank=r, world_size=2
            )
        )
        for r in range(2)
    ]
    for step, batch in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][step], ranks[1][step]]), batch)


def test_eval_windows_errors_at_the_call(shard):
    with pytest.raises(ValueError, match="fewer than one evaluation batch"):
        eval_windows(shard, seq_len=SEQ_LEN, batch_size=NUM_WINDOWS + 1, max_batches=1)
    with pytest.raises(ValueError, match="max_batches: must be positive"):
        eval_windows(shard, seq_len=SEQ_LEN, batch_size=2, max_batches=0)
