"""The `[finetune.loram]` section: how LoRAM prunes (and QLoRAM quantizes) the frozen model.

LoRAM (Zhang et al., "Train Small, Infer Large", ICLR 2025, arXiv:2502.13533) trains the LoRA
configured in `[finetune.lora]` on a pruned copy of the pretrained model, then recovers the
adapters to the original shapes (zero rows/columns at pruned positions) and merges them into the
full model. This module is torch-free so the trainer's config tree can import it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["IMPORTANCE_SCORES", "PRUNING_VARIANTS", "QUANTIZE_FORMATS", "LoramConfig"]

# structured / random remove whole KV groups and MLP channels (shapes shrink); semi_structured
# (N:M) and unstructured zero single weights in place (shapes kept): arXiv:2502.13533, Table 4.
PRUNING_VARIANTS = ("structured", "random", "semi_structured", "unstructured")
# magnitude: the L2 norm of a structure's weights (structured) or |w| (semi/unstructured), the
# data-free score (the "l2" importance of LLM-Pruner's code, Ma et al. 2023, arXiv:2305.11627).
IMPORTANCE_SCORES = ("magnitude",)
QUANTIZE_FORMATS = ("none", "nf4")


@dataclass(kw_only=True)
class LoramConfig:
    """Pruning, quantization and alignment of the frozen model LoRAM trains its LoRA on.

    Attributes:
        prune_ratio: fraction removed in every pruned layer: of the KV groups (with their query
            heads) and of the MLP channels for "structured"/"random", of the weights of each
            pruned linear for "unstructured". Not read by "semi_structured", whose ratio is
            1 - semi_structured_n / semi_structured_m. LoRAM's 70B recipes use 0.85
            (arXiv:2502.13533, Tables 5-6); 0.0 keeps everything (then LoRAM equals plain LoRA).
        pruning: "structured" (lowest-importance heads/channels), "random" (same structure,
            chosen at random), "semi_structured" (N:M zeros), "unstructured" (lowest-importance
            weights zeroed).
        importance: how structures / weights are ranked (IMPORTANCE_SCORES); "random" ignores it.
        keep_first_layers: the first layers stay dense (LoRAM's 70B script prunes layers 4..77
            of 80, so 4 stay dense at the start; arXiv:2502.13533 code, pruned_start=4).
        keep_last_layers: the last layers stay dense (2 in the same script, pruned_end=78).
        semi_structured_n: weights kept in every group of semi_structured_m consecutive inputs.
        semi_structured_m: the group length of N:M sparsity (2:4 is NVIDIA's sparse-tensor-core
            pattern, Mishra et al. 2021, arXiv:2104.08378).
        quantize: "none" (LoRAM) or "nf4" (QLoRAM: the pruned frozen linears stored in 4-bit
            NormalFloat, Dettmers et al. 2023, arXiv:2305.14314).
        nf4_block_size: weights per absmax block (64 in QLoRA, section 3 "Double Quantization").
        double_quant: quantize the fp32 block absmaxes to 8 bits as well (QLoRA's double
            quantization; LoRAM's QLoRAM uses it, bnb_4bit_use_double_quant=True).
        double_quant_block_size: absmaxes per second-level block (256 in QLoRA, section 3).
        alignment_steps: optimizer steps of full-parameter training of the pruned model on `[data]`
            (its plain text, embedding and output layer frozen) before the LoRA is added: LoRAM's
            alignment (arXiv:2502.13533; its `1_pruned_full_rank_weight_alignment.py`);
            0 (the default) trains the LoRA on the pruned weights as they are.
        alignment_lr: AdamW learning rate of alignment, constant (5e-5 in LoRAM's alignment script).
        seed: seed of the "random" variant's choice (identical on every rank).
    """

    prune_ratio: float = 0.85
    pruning: str = "structured"
    importance: str = "magnitude"
    keep_first_layers: int = 4
    keep_last_layers: int = 2
    semi_structured_n: int = 2
    semi_structured_m: int = 4
    quantize: str = "none"
    nf4_block_size: int = 64
    double_quant: bool = True
    double_quant_block_size: int = 256
    alignment_steps: int = 0
    alignment_lr: float = 5e-5
    seed: int = 0

    @property
    def structured(self) -> bool:
        """Whether the variant removes whole structures (shapes shrink) rather than zeroing weights."""
        return self.pruning in ("structured", "random")

    @property
    def effective_ratio(self) -> float:
        """The fraction pruned in a pruned layer (1 - N/M for semi_structured)."""
        if self.pruning == "semi_structured":
            return 1.0 - self.semi_structured_n / self.semi_structured_m
        return self.prune_ratio

    def validate(self) -> None:
        """Raise ValueError("field: what is wrong, got X") for the first bad field."""
        if isinstance(self.prune_ratio, bool) or not isinstance(self.prune_ratio, (int, float)):
            raise ValueError(f"prune_ratio: must be a number in [0, 1), got {self.prune_ratio!r}")
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ValueError(f"prune_ratio: must be in [0, 1), got {self.prune_ratio!r}")
        _one_of("pruning", self.pruning, PRUNING_VARIANTS)
        _one_of("importance", self.importance, IMPORTANCE_SCORES)
        _one_of("quantize", self.quantize, QUANTIZE_FORMATS)
        for name in ("keep_first_layers", "keep_last_layers", "alignment_steps"):
            _integer(name, getattr(self, name), minimum=0)
        for name in ("semi_structured_n", "nf4_block_size", "double_quant_block_size"):
            _integer(name, getattr(self, name), minimum=1)
        _integer("semi_structured_m", self.semi_structured_m, minimum=2)
        _integer("seed", self.seed, minimum=0)
        if self.semi_structured_n >= self.semi_structured_m:
            raise ValueError(
                f"semi_structured_n: must be below semi_structured_m={self.semi_structured_m}, "
                f"got {self.semi_structured_n}"
            )
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant: must be true or false, got {self.double_quant!r}")
        if isinstance(self.alignment_lr, bool) or not isinstance(self.alignment_lr, (int, float)) or not self.alignment_lr > 0:
            raise ValueError(f"alignment_lr: must be a positive number, got {self.alignment_lr!r}")


def _one_of(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {', '.join(allowed)}, got {value!r}")


def _integer(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
