"""SpIEL and LT-SFT through `wren train` from a wren pretrained run: 2 gloo ranks equal 1 process
(losses within 1e-5 relative, same supports), only the deltas train and hold optimizer state of
exactly k entries, the frozen weights are the pretrained ones, the delta file applied to the base
gives the fine-tuned weights, and a run resumed inside a selection window continues exactly."""

from __future__ import annotations

import pytest
import torch

from models.peft.sparse_delta import DELTA_FILE, add_sparse_deltas, load_sparse_deltas
from tests.distributed import run_on_ranks
from tests.trainer.finetune_jobs import (
    branch,
    finetune_job,
    finetune_jobs,
    losses_after,
    pretrained_base,
)
from tests.trainer.jobs import losses, tiny_overrides
from trainer.export_hf import load_model_from_run

SPIEL = {
    "finetune__method": "spiel",
    "finetune__spiel__density": 0.01,
    "finetune__spiel__reselection_steps": 4,
    "finetune__spiel__selection_accumulation_steps": 2,
    "finetune__spiel__initial_reselection_rate": 0.5,
    "optimizer__lr": 1e-2,
}
LT_SFT = {
    "finetune__method": "lt_sft",
    "finetune__lt_sft__density": 0.01,
    "finetune__lt_sft__full_finetune_steps": 4,
    "optimizer__lr": 1e-2,
}


@pytest.fixture(scope="module")
def base_run(corpus, data_cache, tmp_path_factory):
    """A few steps of pretraining: the checkpoint the fine-tuning tests start from."""
    return pretrained_base(corpus, data_cache, tmp_path_factory)


def _overrides(corpus, data_cache, root, name, base, method, **extra):
    return tiny_overrides(corpus, data_cache, root, name, finetune__init_from=str(base), **{**method, **extra})


@pytest.fixture(scope="module")
def two_ranks(corpus, data_cache, tmp_path_factory, base_run):
    """SpIEL and LT-SFT trained on 2 gloo ranks, in one launch: (runs root, method -> rank 0's report)."""
    root = tmp_path_factory.mktemp("two_ranks")
    methods = {"spiel": SPIEL, "lt_sft": LT_SFT}
    jobs = [_overrides(corpus, data_cache, root, name, base_run, method) for name, method in methods.items()]
    return root, dict(zip(methods, run_on_ranks(finetune_jobs, 2, jobs)[0]))


def _check_against_base(results, base_run, run_dirs):
    base, _, _ = load_model_from_run(base_run)  # the oracle: the pretrained run's own weights
    base_weights = {name: p.detach() for name, p in base.named_parameters()}
    for result in results:
        assert set(result["frozen"]) == set(base_weights)
        for name, value in result["frozen"].items():
            assert torch.equal(torch.from_numpy(value), base_weights[name]), name
    files = [load_sparse_deltas(d / DELTA_FILE) for d in run_dirs]
    for name, (indices, values, _) in files[0].items():
        assert torch.equal(files[1][name][0], indices), name
        torch.testing.assert_close(files[1][name][1], values, rtol=1e-5, atol=1e-7)
    composed = dict(base_weights)
    add_sparse_deltas(composed, files[0])
    assert results[0]["merged"]
    for name, weight in results[0]["merged"].items():
        assert torch.equal(composed[name], torch.from_numpy(weight)), name
    return files[0]


def _check_losses(one_dir, two_dir, steps=10):
    one, two = losses(one_dir), losses(two_dir)
    assert sorted(one) == sorted(two) == list(range(1, steps + 1))
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-5 * abs(one[step]), (step, one[step], two[step])


@pytest.mark.slow
def test_spiel_two_ranks_match_one_rank(corpus, data_cache, tmp_path, base_run, two_ranks):
    root, reports = two_ranks
    single = finetune_job(_overrides(corpus, data_cache, tmp_path, "one", base_run, SPIEL), merged=True)
    sharded = reports["spiel"]
    _check_losses(tmp_path / "one", root / "spiel")
    for result in (single, sharded):
        assert result["trainable"] and all(n.endswith(".delta_values") for n in result["trainable"])
        assert result["state_numel"] == result["trainable"]  # optimizer state only for the k active entries
    deltas = _check_against_base([single, sharded], base_run, [tmp_path / "one", root / "spiel"])
    k_total = sum(single["trainable"].values())
    assert sum(v.numel() for _, v, _ in deltas.values()) == k_total
    assert all(indices.unique().numel() == indices.numel() for indices, _, _ in deltas.values())


@pytest.mark.slow
def test_spiel_resume_inside_a_selection_window_is_exact(corpus, data_cache, tmp_path, base_run):
    common = {"checkpoint__every_steps": 5, "training__steps": 10, "schedule__name": "constant"}
    finetune_job(_overrides(corpus, data_cache, tmp_path, "reference", base_run, SPIEL, **common))
    # Step 5 lies inside the capture window of updates 4..6 (selection after update 6).
    branch(tmp_path / "reference", tmp_path / "resumed", 5)  # as if "resumed" had stopped after step 5
    finetune_job(_overrides(corpus, data_cache, tmp_path, "resumed", base_run, SPIEL, **common))
    assert losses(tmp_path / "resumed") == losses_after(tmp_path / "reference", 5)
    reference, resumed = (load_sparse_deltas(tmp_path / d / DELTA_FILE) for d in ("reference", "resumed"))
    for name, (indices, values, _) in reference.items():
        assert torch.equal(resumed[name][0], indices) and torch.equal(resumed[name][1], values), name


@pytest.mark.slow
def test_lt_sft_two_ranks_match_one_rank(corpus, data_cache, tmp_path, base_run, two_ranks):
    root, reports = two_ranks
    single = finetune_job(_overrides(corpus, data_cache, tmp_path, "one", base_run, LT_SFT), merged=True)
    sharded = reports["lt_sft"]
    _check_losses(tmp_path / "one", root / "lt_sft")
    for result in (single, sharded):
        assert result["trainable"] and all(n.endswith(".delta") for n in result["trainable"])
    deltas = _check_against_base([single, sharded], base_run, [tmp_path / "one", root / "lt_sft"])
    total = sum(p.numel() for p in load_model_from_run(base_run)[0].parameters())
    assert sum(v.numel() for _, v, _ in deltas.values()) == int(total * 0.01)


@pytest.mark.slow
def test_lt_sft_resume_after_the_rewind_is_exact(corpus, data_cache, tmp_path, base_run):
    common = {"checkpoint__every_steps": 5, "training__steps": 10, "schedule__name": "constant"}
    finetune_job(_overrides(corpus, data_cache, tmp_path, "reference", base_run, LT_SFT, **common))
    # The checkpoint at step 5 is one step into the sparse phase: the mask must come back with it.
    branch(tmp_path / "reference", tmp_path / "resumed", 5)  # as if "resumed" had stopped after step 5
    finetune_job(_overrides(corpus, data_cache, tmp_path, "resumed", base_run, LT_SFT, **common))
    assert losses(tmp_path / "resumed") == losses_after(tmp_path / "reference", 5)
    reference, resumed = (load_sparse_deltas(tmp_path / d / DELTA_FILE) for d in ("reference", "resumed"))
    for name, (indices, values, _) in reference.items():
        assert torch.equal(resumed[name][0], indices) and torch.equal(resumed[name][1], values), name
