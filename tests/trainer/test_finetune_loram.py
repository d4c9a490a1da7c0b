"""LoRAM and QLoRAM through `wren train` from a wren pretrained run: 2 gloo ranks equal 1 process,
only the adapters train, the frozen weights are the pruned pretrained ones, 0% pruning trains
exactly as plain LoRA, resume is exact, and the export merged into the full model equals `peft`
loading the recovered adapter onto the full base model."""

from __future__ import annotations

import copy

import pytest
import torch

from models.peft.loram_config import LoramConfig
from models.peft.prune import prune_model
from tests.distributed import run_on_ranks
from tests.trainer.finetune_jobs import (
    branch,
    finetune_job,
    finetune_jobs,
    losses_after,
    pretrained_base,
)
from tests.trainer.jobs import losses, tiny_overrides
from trainer.export_hf import export_hf, load_model_from_run

TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
# The variants that run on 1 process and on 2 ranks (all 2-rank runs share one launch of the ranks).
VARIANTS = {
    "loram": {},
    "qloram": {"finetune__loram__quantize": "nf4"},
    "alignment": {"finetune__loram__alignment_steps": 3, "finetune__loram__alignment_lr": 1e-3},
}


@pytest.fixture(scope="module")
def base_run(corpus, data_cache, tmp_path_factory):
    """A few steps of pretraining: the checkpoint every fine-tuning test starts from."""
    return pretrained_base(corpus, data_cache, tmp_path_factory)


def loram_overrides(corpus, data_cache, root, name, base, **extra):
    """A tiny LoRAM job: both layers pruned by half (1 of 2 KV groups, 64 of 128 channels)."""
    values = {
        "finetune__method": "loram", "finetune__init_from": str(base), "finetune__lora__rank": 4,
        "finetune__lora__target_modules": TARGETS, "finetune__loram__prune_ratio": 0.5,
        "finetune__loram__keep_first_layers": 0, "finetune__loram__keep_last_layers": 0, "optimizer__lr": 1e-2,
    }
    values.update(extra)
    return tiny_overrides(corpus, data_cache, root, name, **values)


@pytest.fixture(scope="module")
def two_ranks(corpus, data_cache, tmp_path_factory, base_run):
    """Every variant trained on 2 gloo ranks, in one launch: (runs root, variant -> rank 0's report)."""
    root = tmp_path_factory.mktemp("two_ranks")
    jobs = [loram_overrides(corpus, data_cache, root, name, base_run, **extra) for name, extra in VARIANTS.items()]
    return root, dict(zip(VARIANTS, run_on_ranks(finetune_jobs, 2, jobs)[0]))


def _close_losses(a, b) -> None:
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])


def _pruned_base(base_run):
    """The oracle for the frozen weights: the base run's weights, pruned here."""
    base, _, _ = load_model_from_run(base_run)
    pruned = copy.deepcopy(base)
    prune_model(pruned, LoramConfig(prune_ratio=0.5, keep_first_layers=0, keep_last_layers=0))
    return pruned


@pytest.mark.slow
def test_loram_two_ranks_match_one_rank_and_export_merges_into_the_full_model(corpus, data_cache, tmp_path, base_run, two_ranks):
    import peft
    import transformers

    root, reports = two_ranks
    single = finetune_job(loram_overrides(corpus, data_cache, tmp_path, "one", base_run))
    sharded = reports["loram"]
    _close_losses(losses(tmp_path / "one"), losses(root / "loram"))

    expected = {name: p.detach() for name, p in _pruned_base(base_run).named_parameters()}
    for result in (single, sharded):
        assert result["trainable"] and all(n.endswith((".lora_A", ".lora_B")) for n in result["trainable"])
        assert result["with_state"] == sorted(result["trainable"])
        assert len(result["trainable"]) == 2 * 7 * 2
        assert set(result["frozen"]) == set(expected)
        for name, value in result["frozen"].items():
            assert torch.equal(torch.from_numpy(value), expected[name]), name

    export_hf(base_run, tmp_path / "base_hf")
    export_hf(root / "loram", tmp_path / "merged")  # `wren export-hf`, dispatched to models.peft.loram:export_loram
    export_hf(root / "loram", tmp_path / "adapter", adapter=True)
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        base_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf").eval()
        base_logits = base_hf(tokens).logits
        with_adapter = peft.PeftModel.from_pretrained(base_hf, tmp_path / "adapter").eval()
        merged_logits = merged(tokens).logits
        torch.testing.assert_close(merged_logits, with_adapter(tokens).logits, rtol=1e-4, atol=1e-4)
    assert merged.config.intermediate_size == 128 and merged.config.num_key_value_heads == 2  # the full shapes
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the trained adapters changed the full model


@pytest.mark.slow
def test_qloram_two_ranks_match_one_rank(corpus, data_cache, tmp_path, base_run, two_ranks):
    root, reports = two_ranks
    single = finetune_job(loram_overrides(corpus, data_cache, tmp_path, "one", base_run, **VARIANTS["qloram"]))
    _close_losses(losses(tmp_path / "one"), losses(root / "qloram"))
    for result in (single, reports["qloram"]):
        assert all(n.endswith((".lora_A", ".lora_B")) for n in result["trainable"])
        assert result["with_state"] == sorted(result["trainable"])
        codes = [n for n in result["frozen"] if n.endswith("nf4_codes")]
        assert len(codes) == 2 * 7 and all(result["frozen"][n].dtype.name == "uint8" for n in codes)
        for name in codes:
            assert torch.equal(torch.from_numpy(single["frozen"][name]), torch.from_numpy(result["frozen"][name]))


@pytest.mark.slow
def test_zero_pruning_trains_exactly_as_lora_and_resume_is_exact(corpus, data_cache, tmp_path, base_run):
    zero = {"finetune__loram__prune_ratio": 0.0, "finetune__lora__target_modules": ["wq", "wv"]}
    finetune_job(loram_overrides(corpus, data_cache, tmp_path, "loram0", base_run, **zero))
    finetune_job(loram_overrides(corpus, data_cache, tmp_path, "lora", base_run, finetune__method="lora", **zero))
    assert losses(tmp_path / "loram0") == losses(tmp_path / "lora")

    common = {"checkpoint__every_steps": 3, "training__steps": 6, "schedule__name": "constant"}
    finetune_job(loram_overrides(corpus, data_cache, tmp_path, "reference", base_run, **common))
    branch(tmp_path / "reference", tmp_path / "resumed", 3)  # as if "resumed" had stopped after step 3
    finetune_job(loram_overrides(corpus, data_cache, tmp_path, "resumed", base_run, **common))
    assert losses(tmp_path / "resumed") == losses_after(tmp_path / "reference", 3)


@pytest.mark.slow
def test_alignment_trains_the_pruned_model_identically_on_every_rank(corpus, data_cache, tmp_path, base_run, two_ranks):
    root, reports = two_ranks
    single = finetune_job(loram_overrides(corpus, data_cache, tmp_path, "one", base_run, **VARIANTS["alignment"]))
    sharded = reports["alignment"]
    _close_losses(losses(tmp_path / "one"), losses(root / "alignment"))

    pruned = _pruned_base(base_run)
    for name, value in single["frozen"].items():
        aligned, reference = torch.from_numpy(value), pruned.get_parameter(name).detach()
        torch.testing.assert_close(torch.from_numpy(sharded["frozen"][name]), aligned, rtol=1e-5, atol=1e-6)
        if name.startswith(("tok_embeddings", "output")):
            assert torch.equal(aligned, reference), name  # frozen during alignment
        else:
            assert not torch.equal(aligned, reference), name  # trained by alignment
