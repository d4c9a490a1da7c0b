"""Sparse deltas on frozen linear weights: SpIEL's index + value arrays (Ansell et al. 2024, arXiv:2401.16405).

A targeted `nn.Linear` with weight W (d_out x d_in) keeps k flat, row-major positions eta (a buffer,
`delta_indices`) and k trainable values phi (`delta_values`, initialised to 0), and computes

    y = x (W + S(eta, phi))^T + b,      S(eta, phi) = zeros_like(W).view(-1).index_add(0, eta, phi)

(SpIEL section 3; AlanAnsell/peft src/peft/tuners/sft/layer.py). The custom autograd function keeps
no dense copy alive between forward and backward: it saves x, W, phi and eta and rebuilds W + S in
backward, where the dense weight gradient dW = dy^T x exists only for that one layer; dphi is its
gather dW.view(-1)[eta], W gets no gradient, and a selector may look at dW (SpIEL-AG's candidates)
through `SparseDeltaLinear.grad_observer`.

k per weight: density x (all model parameters) split over the targets in proportion to their size
(`SftModel.inject_adapter`), or a LoRA-matched count (`SparseTargetConfig.match_lora_rank`).

Deltas leave a model as {weight name: (indices, values, shape)} and are stored as safetensors files
holding only tensors (`<weight>.indices`, `<weight>.values`, `<weight>.shape`); they compose by
addition (`add_sparse_deltas`, `models.peft.compose`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.peft.lora import freeze_except, target_linears
from models.peft.sparse_config import SparseTargetConfig, SpielConfig

__all__ = [
    "DELTA_FILE",
    "DeltaFileWriter",
    "SparseDelta",
    "SparseDeltaLinear",
    "add_sparse_deltas",
    "apply_sparse_deltas",
    "apply_spiel",
    "load_sparse_deltas",
    "local_shard",
    "merge_and_unload_sparse",
    "save_sparse_deltas",
    "sparse_delta_modules",
    "sparse_deltas",
    "tunable_counts",
]

DELTA_PARAM_NAMES = ("delta_values",)
DELTA_FILE = "sparse_delta.safetensors"  # written into the run directory after the last step

SparseDelta = tuple[Tensor, Tensor, tuple[int, ...]]  # (flat int64 indices, values, weight shape)


def local_shard(tensor: Tensor) -> tuple[Tensor, int]:
    """(this rank's part, its offset along dim 0) of a plain tensor or an FSDP2 Shard(0) DTensor."""
    if not hasattr(tensor, "to_local"):
        return tensor, 0
    mesh = tensor.device_mesh
    chunk = -(-tensor.shape[0] // mesh.size())  # torch.chunk sizes, as FSDP2's Shard(0)
    return tensor.to_local(), min(mesh.get_local_rank() * chunk, tensor.shape[0])


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor (all-gathered when it is a DTensor)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class _SparseDeltaLinearFn(torch.autograd.Function):
    """y = x (W + S(eta, phi))^T + b, rebuilding W + S in backward instead of saving it."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, module):
        ctx.module = module
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, values, indices)
        return F.linear(x, _dense(weight, values, indices, x.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, values, indices = ctx.saved_tensors
        merged = _dense(weight, values, indices, dy.dtype)
        dx = dy @ merged
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dweight = (dy2.t() @ x2).float()  # transient, this layer only
        dvalues = dweight.view(-1).index_select(0, indices).to(values.dtype)
        observer = ctx.module.grad_observer
        if observer is not None:
            observer(ctx.module, dweight, dvalues)
        dbias = dy2.sum(0) if ctx.has_bias else None
        return dx, None, dbias, dvalues, None, None


def _dense(weight: Tensor, values: Tensor, indices: Tensor, dtype: torch.dtype) -> Tensor:
    merged = weight.to(dtype, copy=True)
    merged.view(-1).index_add_(0, indices, values.to(dtype))
    return merged


class SparseDeltaLinear(nn.Linear):
    """An `nn.Linear` whose frozen `weight` is offset by k trainable entries.

    `weight` and `bias` are the base layer's own tensors (a base checkpoint keeps its keys);
    `delta_indices` (buffer, int64, flat row-major positions, distinct) and `delta_values`
    (parameter) are the delta. `grad_observer(module, dense_grad, values_grad)`, when set, sees
    every backward's transient dense weight gradient (set by `optim.sparse_select`).
    """

    def __init__(self, base: nn.Linear, *, k: int, seed: int, dtype: torch.dtype = torch.float32) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base tensors are reused, not re-created
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        if not 0 < k <= self.weight.numel():
            raise ValueError(f"k: must be in [1, {self.weight.numel()}] for a {tuple(self.weight.shape)} weight, got {k}")
        self.seed = seed
        device = base.weight.device
        self.register_buffer("delta_indices", torch.zeros(k, dtype=torch.int64, device=device))
        self.delta_values = nn.Parameter(torch.zeros(k, dtype=dtype, device=device))
        self.grad_observer: Callable[[SparseDeltaLinear, Tensor, Tensor], None] | None = None
        if device.type != "meta":
            self.reset_peft_parameters()

    @property
    def k(self) -> int:
        """Number of tunable entries (held exactly)."""
        return self.delta_indices.numel()

    @torch.no_grad()
    def reset_peft_parameters(self) -> None:
        """k distinct random positions (top-k of uniform noise, sorted; as SpIEL's `SparseDelta`), zero values.

        The noise comes from a generator seeded by `seed`, so every rank draws the same positions.
        """
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.rand(self.weight.numel(), generator=generator)
        positions = noise.topk(self.k, sorted=False).indices.sort().values
        local, _ = local_shard(self.delta_indices)
        local.copy_(positions.to(local.device))
        nn.init.zeros_(self.delta_values)

    def forward(self, x: Tensor) -> Tensor:
        """x (W + S(eta, phi))^T + b, in the autocast dtype when autocast is on."""
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
            bias = None if self.bias is None else self.bias.to(x.dtype)
            with torch.autocast(x.device.type, enabled=False):
                return _SparseDeltaLinearFn.apply(x, self.weight, bias, self.delta_values, self.delta_indices, self)
        return _SparseDeltaLinearFn.apply(x, self.weight, self.bias, self.delta_values, self.delta_indices, self)

    @torch.no_grad()
    def dense_delta(self) -> Tensor:
        """S(eta, phi) as a dense fp32 tensor of W's shape."""
        values = full_tensor(self.delta_values).float()
        return torch.zeros(self.weight.shape, device=values.device).view(-1).index_add_(0, self.delta_indices, values).view(self.weight.shape)

    def unload_peft(self) -> nn.Linear:
        """The plain layer with the delta folded in (the export protocol of `models.peft`)."""
        return self.to_linear()

    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` holding W + S(eta, phi) (the delta merged, in W's dtype; unsharded model)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            merged = (self.weight.double() + self.dense_delta().double()).to(self.weight.dtype)
            linear.weight = nn.Parameter(merged, requires_grad=False)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"


def tunable_counts(model: nn.Module, names: list[str], cfg: SparseTargetConfig) -> dict[str, int]:
    """k per targeted linear: LoRA-matched or density x all parameters, split in proportion to size.

    LoRA matching: r x sum (d_in + d_out) over the targets (SpIEL scripts' PARAMS_PER_RANK); density:
    `int(total x density)` then `int(total_tunable x numel / sum numel)` per module (`SftModel`).
    """
    modules = [model.get_submodule(n) for n in names]
    sizes = [m.weight.numel() for m in modules]
    if cfg.match_lora_rank:
        total = cfg.match_lora_rank * sum(m.in_features + m.out_features for m in modules)
    else:
        total = int(sum(p.numel() for p in model.parameters()) * cfg.density)
    counts = {n: int(total * size / sum(sizes)) for n, size in zip(names, sizes)}
    empty = [n for n, k in counts.items() if k < 1]
    if empty:
        raise ValueError(f"density: gives no tunable entry to {empty[0]} ({total} entries over {len(names)} weights)")
    return counts


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_sparse_deltas(model: nn.Module, cfg: SparseTargetConfig, *, seed: int) -> dict[str, int]:
    """Wrap the targeted linears in `SparseDeltaLinear` (in place), freeze the rest; returns k per name.

    Structure only: works on a meta-device model (indices and values are set by
    `reset_peft_parameters` once materialised). Each module's positions are seeded by `seed` and
    a checksum of its name, so they differ between layers and agree between ranks.
    """
    cfg.validate()
    names = [n for n in target_linears(model, cfg.target_modules) if not isinstance(model.get_submodule(n), SparseDeltaLinear)]
    if not names:
        raise ValueError(f"target_modules: {cfg.target_modules} select no linear layer of {type(model).__name__}")
    counts = tunable_counts(model, names, cfg)
    dtype = getattr(torch, cfg.delta_dtype)
    for name in names:
        module_seed = (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
        _replace(model, name, SparseDeltaLinear(model.get_submodule(name), k=counts[name], seed=module_seed, dtype=dtype))
    freeze_except(model, [*DELTA_PARAM_NAMES, *cfg.trainable_modules])
    return counts


def sparse_delta_modules(model: nn.Module) -> Iterator[tuple[str, SparseDeltaLinear]]:
    """(name, module) for every `SparseDeltaLinear` in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, SparseDeltaLinear):
            yield name, module


def apply_spiel(model: nn.Module, ctx: Any) -> nn.Module:
    """Fine-tuning method "spiel": sparse deltas plus the drop/regrow selector (`optim.sparse_select`).

    Reads `ctx.cfg.finetune.spiel`; registers the selector as a step hook and as checkpoint state
    "spiel_selector". Structure only, so it may run on a meta-device model.
    """
    from optim.sparse_select import SpielSelector

    cfg: SpielConfig = ctx.cfg.finetune.spiel
    counts = apply_sparse_deltas(model, cfg, seed=ctx.cfg.run.seed)
    selector = SpielSelector(model, cfg, total_steps=ctx.cfg.training.steps, ctx=ctx)
    ctx.step_hooks.append(selector)
    ctx.step_hooks.append(DeltaFileWriter(lambda: sparse_deltas(model), ctx=ctx, method="spiel"))
    ctx.checkpoint_state["spiel_selector"] = selector
    total = sum(p.numel() for p in model.parameters())
    ctx.log(
        f"wren: SpIEL-{cfg.selection.upper()}: {len(counts)} weights, {sum(counts.values())} tunable entries "
        f"({sum(counts.values()) / total:.4%} of {total}); reselect every {cfg.reselection_steps} steps"
    )
    return model


def sparse_deltas(model: nn.Module) -> dict[str, SparseDelta]:
    """{weight parameter name: (indices, values, shape)} of every `SparseDeltaLinear` (full, on CPU).

    Names are the unwrapped model's (activation-checkpoint wrappers left out).
    """
    out = {}
    for name, module in sparse_delta_modules(model):
        name = name.replace("_checkpoint_wrapped_module.", "")
        values = full_tensor(module.delta_values).detach().float().cpu()
        out[f"{name}.weight" if name else "weight"] = (module.delta_indices.cpu().clone(), values, tuple(module.weight.shape))
    return out


class DeltaFileWriter:
    """Step hook: after the run's last step, write `collect()`'s deltas to `<run_dir>/sparse_delta.safetensors`.

    `collect` runs on every rank (it all-gathers sharded values); the main rank writes.
    """

    def __init__(self, collect: Callable[[], dict[str, SparseDelta]], *, ctx: Any, method: str) -> None:
        self.collect, self.ctx, self.method = collect, ctx, method

    def __call__(self, step: int) -> None:
        """Write the file when `step` is the run's last."""
        if step != self.ctx.cfg.training.steps:
            return
        deltas = self.collect()
        if self.ctx.env.is_main:
            path = save_sparse_deltas(Path(self.ctx.cfg.run.run_dir) / DELTA_FILE, deltas, {"method": self.method})
            self.ctx.log(f"wren: {self.method} deltas ({sum(v.numel() for _, v, _ in deltas.values())} entries) saved to {path}")


def merge_and_unload_sparse(model: nn.Module) -> nn.Module:
    """Fold every delta into its weight and put plain `nn.Linear` layers back (unsharded model)."""
    for name, module in list(sparse_delta_modules(model)):
        _replace(model, name, module.to_linear())
    return model


@torch.no_grad()
def add_sparse_deltas(state_dict: dict[str, Tensor], *delta_sets: dict[str, SparseDelta], sign: float = 1.0) -> None:
    """state_dict[w].view(-1)[indices] += sign * values for every delta set; revert with sign=-1.

    All sets are summed onto the weight in fp64 and cast back once, and the entries are replaced
    (new tensors): a sum of a few fp32 deltas is exact in fp64, so the result does not depend on
    the order of the sets. A delta naming a weight the base lacks, or of another shape, is a ValueError.
    """
    by_weight: dict[str, list[SparseDelta]] = {}
    for deltas in delta_sets:
        for name, delta in deltas.items():
            if name not in state_dict:
                raise ValueError(f"delta for {name!r}: the base has no such weight")
            if tuple(state_dict[name].shape) != tuple(delta[2]):
                raise ValueError(f"delta for {name!r}: shape {tuple(delta[2])}, the base weight is {tuple(state_dict[name].shape)}")
            by_weight.setdefault(name, []).append(delta)
    for name, deltas in by_weight.items():
        weight = state_dict[name]
        summed = weight.to(torch.float64, copy=True).reshape(-1)
        for indices, values, _ in deltas:
            summed.index_add_(0, indices.long(), values.double() * sign)
        state_dict[name] = summed.view(weight.shape).to(weight.dtype)


def save_sparse_deltas(path: str | Path, deltas: dict[str, SparseDelta], metadata: dict[str, str] | None = None) -> Path:
    """Write `deltas` as a safetensors file: `<w>.indices` (int64), `<w>.values`, `<w>.shape` per weight."""
    from safetensors.torch import save_file

    tensors = {}
    for name, (indices, values, shape) in deltas.items():
        tensors[f"{name}.indices"] = indices.to(torch.int64).contiguous()
        tensors[f"{name}.values"] = values.contiguous()
        tensors[f"{name}.shape"] = torch.tensor(shape, dtype=torch.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "wren-sparse-delta", **(metadata or {})})
    return path


def load_sparse_deltas(path: str | Path) -> dict[str, SparseDelta]:
    """Read a file written by `save_sparse_deltas` (tensors only; nothing is unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors delta file ({err})") from None
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    out = {}
    for name in names:
        try:
            indices, values, shape = (tensors[f"{name}.{part}"] for part in ("indices", "values", "shape"))
        except KeyError as err:
            raise ValueError(f"{path}: delta {name!r} lacks {err.args[0]!r}") from None
        out[name] = (indices, values, tuple(int(s) for s in shape))
    return out
