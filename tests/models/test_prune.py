"""LoRAM's pruning against oracles: masked full models, norms computed by slicing, N:M counts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models.llama import Llama, LlamaConfig
from models.peft.loram_config import LoramConfig
from models.peft.prune import PRUNABLE_LINEARS, kept_indices, prune_model

# 8 query heads sharing 4 KV heads (n_rep = 2), head_dim 8
CFG = LlamaConfig(dim=64, n_layers=3, n_heads=8, n_kv_heads=4, vocab_size=97, ffn_hidden_dim=96, max_seq_len=16)


def _model(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(CFG)


def _loram(**kw) -> LoramConfig:
    return LoramConfig(**{"keep_first_layers": 1, "keep_last_layers": 0, "prune_ratio": 0.5, **kw})


def masked_full_logits(full: Llama, kept: dict, tokens: torch.Tensor) -> torch.Tensor:
    """The oracle: the full model with the pruned query heads' outputs and MLP channels set to zero."""
    n_rep, d = CFG.n_heads // CFG.kv_heads, CFG.head_dim
    handles = []
    for i, block in enumerate(full.layers):
        if f"layers.{i}.attention.kv_heads" not in kept:
            continue
        head_mask = torch.zeros(CFG.n_heads * d)
        for h in kept[f"layers.{i}.attention.kv_heads"].tolist():  # kv head h serves query heads h*n_rep .. h*n_rep+n_rep-1
            head_mask[h * n_rep * d : (h + 1) * n_rep * d] = 1
        channel_mask = torch.zeros(CFG.ffn_hidden_dim)
        channel_mask[kept[f"layers.{i}.feed_forward.channels"]] = 1
        handles.append(block.attention.wo.register_forward_pre_hook(lambda m, args, mask=head_mask: (args[0] * mask,)))
        handles.append(block.feed_forward.w2.register_forward_pre_hook(lambda m, args, mask=channel_mask: (args[0] * mask,)))
    try:
        return full(tokens)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("pruning", ["structured", "random"])
def test_structured_pruning_equals_full_model_with_heads_and_channels_masked(pruning):
    full = _model()
    pruned = copy.deepcopy(full)
    kept = prune_model(pruned, _loram(pruning=pruning))
    tokens = torch.randint(0, CFG.vocab_size, (2, 12))
    torch.testing.assert_close(pruned(tokens), masked_full_logits(full, kept, tokens), rtol=1e-5, atol=1e-5)
    assert set(kept) == {f"layers.{i}.{part}" for i in (1, 2) for part in ("attention.kv_heads", "feed_forward.channels")}
    for i in (1, 2):  # whole KV groups: 2 of 4 KV heads stay, with their 2 x 2 query heads (GQA kept consistent)
        attention = pruned.layers[i].attention
        assert (attention.n_kv_heads, attention.n_heads) == (2, 4)
        assert attention.wq.weight.shape == (4 * 8, 64) and attention.wk.weight.shape == (2 * 8, 64)
        assert attention.wo.weight.shape == (64, 4 * 8)
        assert pruned.layers[i].feed_forward.w2.weight.shape == (64, 48)
    assert pruned.layers[0].attention.wq.weight.shape == full.layers[0].attention.wq.weight.shape  # kept dense
    torch.testing.assert_close(pruned.layers[0].attention.wq.weight, full.layers[0].attention.wq.weight)


def test_structured_keeps_the_highest_magnitude_groups_and_channels():
    full = _model(1)
    kept = prune_model(copy.deepcopy(full), _loram(prune_ratio=0.75))
    n_rep, d = CFG.n_heads // CFG.kv_heads, CFG.head_dim
    for i in (1, 2):
        attention, ff = full.layers[i].attention, full.layers[i].feed_forward
        scores = []
        for h in range(CFG.kv_heads):  # the group's weights, sliced one by one
            q = slice(h * n_rep * d, (h + 1) * n_rep * d)
            kv = slice(h * d, (h + 1) * d)
            group = [attention.wq.weight[q], attention.wk.weight[kv], attention.wv.weight[kv], attention.wo.weight[:, q]]
            scores.append(sum(float((w.detach().double() ** 2).sum()) for w in group))
        assert kept[f"layers.{i}.attention.kv_heads"].tolist() == [max(range(4), key=scores.__getitem__)]
        channel_scores = [
            float((ff.w1.weight[j].detach().double() ** 2).sum() + (ff.w3.weight[j].detach().double() ** 2).sum() + (ff.w2.weight[:, j].detach().double() ** 2).sum())
            for j in range(CFG.ffn_hidden_dim)
        ]
        best = sorted(sorted(range(CFG.ffn_hidden_dim), key=lambda j: -channel_scores[j])[:24])
        assert kept[f"layers.{i}.feed_forward.channels"].tolist() == best


def test_random_pruning_is_seeded():
    a = prune_model(_model(), _loram(pruning="random", seed=3))
    b = prune_model(_model(), _loram(pruning="random", seed=3))
    c = prune_model(_model(), _loram(pruning="random", seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_zero_ratio_changes_nothing():
    full = _model()
    pruned = copy.deepcopy(full)
    prune_model(pruned, _loram(prune_ratio=0.0))
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), pruned.state_dict().values()))
    assert [type(m) for m in full.modules()] == [type(m) for m in pruned.modules()]


def test_two_four_masks_keep_exactly_the_two_largest_of_every_four():
    full = _model()
    pruned = copy.deepcopy(full)
    assert prune_model(pruned, _loram(pruning="semi_structured")) == {}
    for i in (1, 2):
        for name in PRUNABLE_LINEARS:
            before = full.layers[i].get_submodule(name).weight.detach()
            after = pruned.layers[i].get_submodule(name).weight.detach()
            assert after.shape == before.shape
            groups_before, groups_after = before.reshape(-1, 4), after.reshape(-1, 4)
            assert ((groups_after != 0).sum(dim=1) == 2).all()
            for g_before, g_after in zip(groups_before[:50], groups_after[:50]):
                top2 = set(g_before.abs().argsort(descending=True)[:2].tolist())
                assert set(g_after.nonzero().flatten().tolist()) == top2
                assert torch.equal(g_after[list(top2)], g_before[list(top2)])
    assert torch.equal(pruned.layers[0].attention.wq.weight, full.layers[0].attention.wq.weight)


def test_unstructured_zeroes_the_smallest_magnitudes():
    full = _model()
    pruned = copy.deepcopy(full)
    prune_model(pruned, _loram(pruning="unstructured", prune_ratio=0.55))
    for name in PRUNABLE_LINEARS:
        before = full.layers[2].get_submodule(name).weight.detach().flatten()
        after = pruned.layers[2].get_submodule(name).weight.detach().flatten()
        zeroed = after == 0
        assert int(zeroed.sum()) == round(0.55 * before.numel())
        assert before[zeroed].abs().max() <= before[~zeroed].abs().min()
        assert torch.equal(after[~zeroed], before[~zeroed])


def test_kept_indices_name_rows_of_q_kv_and_columns_of_o_and_down():
    kept = {"layers.1.attention.kv_heads": torch.tensor([1, 3]), "layers.1.feed_forward.channels": torch.tensor([0, 5])}
    rows = lambda name: kept_indices(kept, name, n_rep=2, head_dim=2)
    q_rows = [4, 5, 6, 7, 12, 13, 14, 15]  # kv head h -> query heads 2h, 2h+1 -> rows [4h, 4h + 4)
    assert rows("layers.1.attention.wq")[0].tolist() == q_rows and rows("layers.1.attention.wq")[1] is None
    assert rows("layers.1.attention.wk")[0].tolist() == [2, 3, 6, 7]
    assert rows("layers.1.attention.wv")[0].tolist() == [2, 3, 6, 7]
    assert rows("layers.1.attention.wo")[0] is None and rows("layers.1.attention.wo")[1].tolist() == q_rows
    assert rows("layers.1.feed_forward.w1")[0].tolist() == [0, 5] and rows("layers.1.feed_forward.w3")[0].tolist() == [0, 5]
    assert rows("layers.1.feed_forward.w2")[1].tolist() == [0, 5]
    assert rows("layers.0.attention.wq") == (None, None) and rows("output") == (None, None)


def test_no_layer_left_to_prune_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="keep_first_layers"):
        prune_model(_model(), _loram(keep_first_layers=2, keep_last_layers=1))
    with pytest.raises(ValueError, match="pruning"):
        prune_model(nn.Sequential(nn.Linear(2, 2)), _loram())
