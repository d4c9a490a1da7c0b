"""SpIEL and LT-SFT through `wren train` from a wren pretrained run: 2 gloo ranks equal 1 process
(losses within 1e-5 relative, same supports), only the deltas train and hold optimizer state of
exactly k entries, the frozen weights are the pretrained ones, the delta file applied to the base
gives the fine-tuned weights, and a run resumed inside a selection window continues exactly."""

from __future__ import annotations

import pytest
import torch

from models.peft.sparse_delta import DELTA_FILE, add_sparse_deltas, load_sparse_deltas
from tests.distributed import run_on_ranks
from tests.trainer.jobs import losses, tiny_overrides, train_job
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
    root = tmp_path_factory.mktemp("base")
    train_job(tiny_overrides(corpus, data_cache, root, "base", training__steps=4))
    return root / "base"


def _overrides(corpus, data_cache, root, name, base, method, **extra):
    return tiny_overrides(corpus, data_cache, root, name, finetune__init_from=str(base), **{**method, **extra})


def finetune_job(overrides: list[str]) -> dict:
    """Train in this process (a rank under the harness); report what trained and the final weights."""
    from trainer.config import JobConfig
    from trainer.distributed import init_distributed, world_size_from_env
    from trainer.train import Trainer

    torch.set_num_threads(1)
    cfg = JobConfig.load(None, overrides, world_size=world_size_from_env())
    trainer = Trainer(cfg, init_distributed(cfg.parallel))
    trainer.fit()
    params = dict(trainer.model.named_parameters())
    full = lambda p: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
    merged = {}
    if not any(hasattr(p, "full_tensor") for p in params.values()):
        for name, module in trainer.model.named_modules():
            if hasattr(module, "unload_peft"):
                merged[name.replace("_checkpoint_wrapped_module.", "") + ".weight"] = module.unload_peft().weight.detach().numpy()
    return {
        "state_numel": {n: int(trainer.optimizer.state[p]["exp_avg"].numel()) for n, p in params.items() if p in trainer.optimizer.state},
        "trainable": {n: p.numel() for n, p in params.items() if p.requires_grad},
        "frozen": {n: full(p).numpy() for n, p in params.items() if not p.requires_grad},
        "merged": merged,
    }


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
def test_spiel_two_ranks_match_one_rank(corpus, data_cache, tmp_path, base_run):
    single = finetune_job(_overrides(corpus, data_cache, tmp_path, "one", base_run, SPIEL))
    sharded = run_on_ranks(finetune_job, 2, _overrides(corpus, data_cache, tmp_path, "two", base_run, SPIEL))[0]
    _check_losses(tmp_path / "one", tmp_path / "two")
    for result in (single, sharded):
        assert result["trainable"] and all(n.endswith(".delta_values") for n in result["trainable"])
        assert result["state_numel"] == result["trainable"]  # optimizer state only for the k active entries
    deltas = _check_against_base([single, sharded], base_run, [tmp_path / "one", tmp_path / "two"])
    k_total = sum(single["trainable"].values())
    assert sum(v.numel() for _, v, _ in deltas.values()) == k_total
    assert all(indices.unique().numel() == indices.numel() for indices, _, _ in deltas.values())


@pytest.mark.slow
def test_spiel_resume_inside_a_selection_window_is_exact(corpus, data_cache, tmp_path, base_run):
    common = {"checkpoint__every_steps": 5, "training__steps": 10, "schedule__name": "constant"}
    finetune_job(_overrides(corpus, data_cache, tmp_path, "reference", base_run, SPIEL, **common))
    # Step 5 lies inside the capture window of updates 4..6 (selection after update 6).
    finetune_job(_overrides(corpus, data_cache, tmp_path, "resumed", base_run, SPIEL, **{**common, "training__steps": 5}))
    finetune_job(_overrides(corpus, data_cache, tmp_path, "resumed", base_run, SPIEL, **common))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "reference")
    reference, resumed = (load_sparse_deltas(tmp_path / d / DELTA_FILE) for d in ("reference", "resumed"))
    for name, (indices, values, _) in reference.items():
        assert torch.equal(resumed[name][0], indices) and torch.equal(resumed[name][1], values), name


@pytest.mark.slow
def test_lt_sft_two_ranks_match_one_rank(corpus, data_cache, tmp_path, base_run):
    single = finetune_job(_overrides(corpus, data_cache, tmp_path, "one", base_run, LT_SFT))
    sharded = run_on_ranks(finetune_job, 2, _overrides(corpus, data_cache, tmp_path, "two", base_run, LT_SFT))[0]
    _check_losses(tmp_path / "one", tmp_path / "two")
    for result in (single, sharded):
        assert result["trainable"] and all(n.endswith(".delta") for n in result["trainable"])
    deltas = _check_against_base([single, sharded], base_run, [tmp_path / "one", tmp_path / "two"])
    total = sum(p.numel() for p in load_model_from_run(base_run)[0].parameters())
    assert sum(v.numel() for _, v, _ in deltas.values()) == int(total * 0.01)


@pytest.mark.slow
def test_lt_sft_resume_after_the_rewind_is_exact(corpus, data_cache, tmp_path, base_run):
    common = {"checkpoint__every_steps": 5, "training__steps": 10, "schedule__name": "constant"}
    finetune_job(_overrides(corpus, data_cache, tmp_path, "reference", base_run, LT_SFT, **common))
    # The checkpoint at step 5 is one step into the sparse phase: the mask must come back with it.
    finetune_job(_overrides(corpus, data_cache, tmp_path, "resumed", base_run, LT_SFT, **{**common, "training__steps": 5}))
    finetune_job(_overrides(corpus, data_cache, tmp_path, "resumed", base_run, LT_SFT, **common))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "reference")
    reference, resumed = (load_sparse_deltas(tmp_path / d / DELTA_FILE) for d in ("reference", "resumed"))
    for name, (indices, values, _) in reference.items():
        assert torch.equal(resumed[name][0], indices) and torch.equal(resumed[name][1], values), name
