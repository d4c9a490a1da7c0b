"""Pruning of a Llama for LoRAM (Zhang et al., ICLR 2025, arXiv:2502.13533, Table 4).

Four variants, chosen by `LoramConfig.pruning`:

- "structured": in every pruned layer, remove the lowest-importance KV groups (a key/value head
  with the query heads that share it, so grouped-query attention stays consistent) and MLP
  channels. The modules shrink, as LLM-Pruner leaves them (LoRAM's
  `modeling_llama3_70b_structured_pruning.py`): a pruned KV head h removes rows
  [h d, (h+1) d) of wk and wv, rows [h r d, (h+1) r d) of wq (r = n_heads / n_kv_heads, d the
  head dimension) and the same columns of wo; a pruned channel j removes row j of w1 and w3 and
  column j of w2.
- "random": the same structures, chosen uniformly at random from a seeded generator.
- "semi_structured": N:M sparsity (N kept weights in every M consecutive inputs of a row), the
  zeros stored in place (shapes unchanged).
- "unstructured": the lowest-|w| fraction of each linear zeroed in place.

The result of a structured prune is the *kept-index map*, `{"layers.{i}.attention.kv_heads": ...,
"layers.{i}.feed_forward.channels": ...}` (sorted int64 indices of the KV heads / MLP channels that
stay, for every pruned layer). `kept_indices` turns it into the kept output rows / input columns
of each linear, which LoRAM's recovery uses to put the trained adapters back at their positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from models.peft.loram_config import LoramConfig

__all__ = [
    "PRUNABLE_LINEARS",
    "kept_indices",
    "nm_mask",
    "prune_model",
    "pruned_layers",
    "unstructured_mask",
]

# The linears of a Llama block that pruning touches (the embedding and output layer never are).
PRUNABLE_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def pruned_layers(n_layers: int, cfg: LoramConfig) -> range:
    """The indices of the layers that are pruned (the others stay dense)."""
    layers = range(cfg.keep_first_layers, n_layers - cfg.keep_last_layers)
    if len(layers) == 0:
        raise ValueError(
            f"keep_first_layers: keep_first_layers={cfg.keep_first_layers} and keep_last_layers="
            f"{cfg.keep_last_layers} leave none of the model's {n_layers} layers to prune"
        )
    return layers


def _kept_count(total: int, ratio: float) -> int:
    """How many of `total` structures stay: round((1 - ratio) * total), at least one."""
    return max(1, min(total, round((1.0 - ratio) * total)))


def _squares(weight: Tensor, dim: int, groups: int) -> Tensor:
    """Sum of squared weights of `groups` equal slices of `weight` along `dim`."""
    w = weight.detach().float().pow(2)
    w = w if dim == 0 else w.t()
    return w.reshape(groups, -1).sum(dim=1)


def _kv_group_magnitude(attention: nn.Module) -> Tensor:
    """Squared L2 norm of every KV group's weights: its wk, wv rows, its query heads' wq rows and wo columns."""
    groups = attention.n_kv_heads
    return (
        _squares(attention.wk.weight, 0, groups)
        + _squares(attention.wv.weight, 0, groups)
        + _squares(attention.wq.weight, 0, groups)
        + _squares(attention.wo.weight, 1, groups)
    )


def _channel_magnitude(feed_forward: nn.Module) -> Tensor:
    """Squared L2 norm of every MLP channel's weights: w1 and w3 rows, the w2 column."""
    channels = feed_forward.w1.out_features
    return (
        _squares(feed_forward.w1.weight, 0, channels)
        + _squares(feed_forward.w3.weight, 0, channels)
        + _squares(feed_forward.w2.weight, 1, channels)
    )


def _top(scores: Tensor, keep: int) -> Tensor:
    """Sorted indices of the `keep` highest scores (ties go to the lower index)."""
    order = torch.argsort(-scores, stable=True)
    return order[:keep].sort().values.to(torch.int64)


def _random(total: int, keep: int, generator: torch.Generator) -> Tensor:
    return torch.randperm(total, generator=generator)[:keep].sort().values.to(torch.int64)


def _expand(heads: Tensor, width: int) -> Tensor:
    """Row indices of whole blocks: block h covers rows [h * width, (h + 1) * width)."""
    return (heads.unsqueeze(1) * width + torch.arange(width)).flatten()


def _sliced_linear(linear: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    """A bias-free linear holding `linear.weight[rows][:, cols]` (built on meta: draws no random numbers)."""
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    out.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    return out


def _prune_attention(attention: nn.Module, kept_kv: Tensor) -> None:
    n_rep = attention.n_heads // attention.n_kv_heads
    d = attention.head_dim
    q_rows, kv_rows = _expand(kept_kv, n_rep * d), _expand(kept_kv, d)
    attention.wq = _sliced_linear(attention.wq, rows=q_rows)
    attention.wk = _sliced_linear(attention.wk, rows=kv_rows)
    attention.wv = _sliced_linear(attention.wv, rows=kv_rows)
    attention.wo = _sliced_linear(attention.wo, cols=q_rows)
    attention.n_kv_heads = len(kept_kv)
    attention.n_heads = len(kept_kv) * n_rep


def _prune_feed_forward(feed_forward: nn.Module, channels: Tensor) -> None:
    feed_forward.w1 = _sliced_linear(feed_forward.w1, rows=channels)
    feed_forward.w3 = _sliced_linear(feed_forward.w3, rows=channels)
    feed_forward.w2 = _sliced_linear(feed_forward.w2, cols=channels)


def nm_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """Boolean mask keeping the n largest |w| in every m consecutive inputs of each row (N:M sparsity)."""
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"semi_structured_m: {m} does not divide a pruned linear's {cols} inputs")
    groups = weight.detach().abs().reshape(rows, cols // m, m)
    keep = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


def unstructured_mask(weight: Tensor, ratio: float) -> Tensor:
    """Boolean mask keeping all but the round(ratio * numel) smallest |w| of `weight`."""
    pruned = round(ratio * weight.numel())
    mask = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    if pruned:
        mask[torch.topk(weight.detach().abs().flatten(), pruned, largest=False).indices] = False
    return mask.reshape(weight.shape)


def _choose_structured(model: nn.Module, layer_ids: range, cfg: LoramConfig) -> dict[str, Tensor]:
    """The kept-index map: KV heads and MLP channels that stay in every pruned layer."""
    generator = torch.Generator().manual_seed(cfg.seed)
    kept: dict[str, Tensor] = {}
    for i in layer_ids:
        block = model.layers[i]
        n_kv, channels = block.attention.n_kv_heads, block.feed_forward.w1.out_features
        keep_kv, keep_ch = _kept_count(n_kv, cfg.prune_ratio), _kept_count(channels, cfg.prune_ratio)
        if cfg.pruning == "random":
            kv, ch = _random(n_kv, keep_kv, generator), _random(channels, keep_ch, generator)
        else:
            kv = _top(_kv_group_magnitude(block.attention), keep_kv)
            ch = _top(_channel_magnitude(block.feed_forward), keep_ch)
        kept[f"layers.{i}.attention.kv_heads"] = kv
        kept[f"layers.{i}.feed_forward.channels"] = ch
    return kept


def _apply_structured(model: nn.Module, kept: dict[str, Tensor]) -> None:
    for i, block in enumerate(model.layers):
        kv = kept.get(f"layers.{i}.attention.kv_heads")
        channels = kept.get(f"layers.{i}.feed_forward.channels")
        if kv is not None and len(kv) < block.attention.n_kv_heads:
            _prune_attention(block.attention, kv)
        if channels is not None and len(channels) < block.feed_forward.w1.out_features:
            _prune_feed_forward(block.feed_forward, channels)


def _mask_linears(model: nn.Module, layer_ids: range, mask_fn: Callable[[Tensor], Tensor]) -> None:
    with torch.no_grad():
        for i in layer_ids:
            for name in PRUNABLE_LINEARS:
                weight = model.layers[i].get_submodule(name).weight
                weight.mul_(mask_fn(weight).to(weight.dtype))


def _structured(model: nn.Module, layer_ids: range, cfg: LoramConfig) -> dict[str, Tensor]:
    kept = _choose_structured(model, layer_ids, cfg)
    _apply_structured(model, kept)
    return kept


def _semi_structured(model: nn.Module, layer_ids: range, cfg: LoramConfig) -> dict[str, Tensor]:
    _mask_linears(model, layer_ids, lambda w: nm_mask(w, cfg.semi_structured_n, cfg.semi_structured_m))
    return {}


def _unstructured(model: nn.Module, layer_ids: range, cfg: LoramConfig) -> dict[str, Tensor]:
    _mask_linears(model, layer_ids, lambda w: unstructured_mask(w, cfg.prune_ratio))
    return {}


# pruning variant -> fn(model, pruned layer ids, cfg) -> kept-index map (empty when shapes are kept)
PRUNERS: dict[str, Callable[[nn.Module, range, LoramConfig], dict[str, Tensor]]] = {
    "structured": _structured,
    "random": _structured,
    "semi_structured": _semi_structured,
    "unstructured": _unstructured,
}


@torch.no_grad()
def prune_model(model: nn.Module, cfg: LoramConfig) -> dict[str, Tensor]:
    """Prune a Llama (with its weights loaded) in place as `cfg` says; returns the kept-index map.

    Deterministic for given weights and config (the "random" variant draws from `cfg.seed`), so
    every rank and every resume prunes identically. The map is empty for the variants that keep
    shapes (semi_structured, unstructured). A ratio that keeps every structure changes nothing.
    """
    cfg.validate()
    layers = getattr(model, "layers", None)
    if layers is None or not all(hasattr(b, "attention") and hasattr(b, "feed_forward") for b in layers):
        raise ValueError(f"pruning: LoRAM prunes Llama models, got {type(model).__name__}")
    return PRUNERS[cfg.pruning](model, pruned_layers(len(layers), cfg), cfg)


def kept_indices(
    kept: dict[str, Tensor], linear_name: str, *, n_rep: int, head_dim: int
) -> tuple[Tensor | None, Tensor | None]:
    """(kept output rows, kept input columns) of the full linear `linear_name` ("layers.3.attention.wq").

    None means the dimension is not pruned (all rows / columns kept).
    """
    prefix, _, leaf = linear_name.rpartition(".")
    layer = prefix.rpartition(".")[0]
    if prefix.endswith("attention") and f"{layer}.attention.kv_heads" in kept:
        heads = kept[f"{layer}.attention.kv_heads"]
        rows = {"wq": _expand(heads, n_rep * head_dim), "wk": _expand(heads, head_dim), "wv": _expand(heads, head_dim)}
        if leaf == "wo":
            return None, _expand(heads, n_rep * head_dim)
        return rows.get(leaf), None
    if prefix.endswith("feed_forward") and f"{layer}.feed_forward.channels" in kept:
        channels = kept[f"{layer}.feed_forward.channels"]
        if leaf == "w2":
            return None, channels
        return (channels, None) if leaf in ("w1", "w3") else (None, None)
    return None, None
