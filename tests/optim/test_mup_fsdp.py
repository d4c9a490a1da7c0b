"""muP under FSDP2: the same per-parameter lr scales and the same training run as one process."""

from tests.distributed import run_on_ranks
from tests.trainer.jobs import losses, tiny_overrides


def mup_job(overrides: list[str]) -> dict:
    """Train one job on this rank; report each parameter's lr scale (by name) and the muP multipliers."""
    from trainer.config import JobConfig
    from trainer.distributed import init_distributed, world_size_from_env
    from trainer.train import Trainer

    cfg = JobConfig.load(None, overrides, world_size=world_size_from_env())
    trainer = Trainer(cfg, init_distributed(cfg.parallel))
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    scales = {names[id(p)]: group["lr_scale"] for group in trainer.optimizer.param_groups for p in group["params"]}
    config = trainer.model.config
    trainer.fit()
    return {"scales": scales, "logit_scale": config.logit_scale, "attention_scale": config.attention_scale}


def test_mup_under_fsdp2_matches_one_process(corpus, data_cache, tmp_path):
    common = dict(mup__enabled=True, mup__base_dim=32, training__steps=6, model__dim=128, model__ffn_hidden_dim=256,
                  optimizer__lr=1e-2, parallel__num_threads=1)

    def overrides(name):
        return tiny_overrides(corpus, data_cache, tmp_path, name, **common)

    single = mup_job(overrides("single"))
    sharded = run_on_ranks(mup_job, 2, overrides("sharded"))[0]
    assert sharded["scales"] == single["scales"]
    assert sorted(set(single["scales"].values())) == [0.25, 1.0]  # hidden matrices at lr / (128 / 32)
    assert sharded["logit_scale"] == single["logit_scale"] == 0.25
    assert sharded["attention_scale"] == single["attention_scale"]
    want, got = losses(tmp_path / "single"), losses(tmp_path / "sharded")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, want[step], got[step])
