"""`[optimizer]` selection of galore / fira / lowrank: config checks, parameter groups, the model transform."""

import pytest
import torch

from models.llama import Llama, LlamaConfig
from optim.builder import OptimizerConfig, build_optimizer, param_groups
from optim.galore import ProjectedAdamW
from optim.lowrank import LowRankLinear, apply_lowrank
from trainer.config import JobConfig
from trainer.errors import ConfigError
from trainer.extensions import BuildContext

TINY = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96, vocab_size=97, max_seq_len=32)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["--optimizer.name=galore", "--optimizer.galore.rank=0"], "optimizer.galore.rank"),
        (
            ["--optimizer.name=galore", "--optimizer.galore.update_proj_gap_steps=0"],
            "optimizer.galore.update_proj_gap_steps",
        ),
        (["--optimizer.name=fira", "--optimizer.fira.limiter_gamma=0.5"], "optimizer.fira.limiter_gamma"),
        (["--optimizer.name=lowrank"], "optimizer.lowrank.rank"),
        (["--optimizer.lowrank.rank=8"], "optimizer.lowrank.rank"),  # adamw cannot refactor or reset
        (["--optimizer.reset_every_steps=10"], "optimizer.reset_every_steps"),
        (["--optimizer.name=galore", "--optimizer.galore.bogus=1"], "optimizer.galore.bogus"),
    ],
)
def test_bad_settings_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        JobConfig.load(None, overrides)


def test_each_name_builds_the_projected_optimizer():
    for name, extra in (("galore", []), ("fira", []), ("lowrank", ["--optimizer.lowrank.rank=8"])):
        cfg = JobConfig.load(None, [f"--optimizer.name={name}", *extra]).optimizer
        optimizer = build_optimizer(cfg, Llama(TINY))
        assert isinstance(optimizer, ProjectedAdamW)
        assert (optimizer.fira_gamma is not None) == (name == "fira")


def test_projected_groups_follow_the_patterns_and_keep_lr_scales():
    model = Llama(TINY)
    scales = {"layers.0.attention.wq.weight": 0.5, "tok_embeddings.weight": 2.0}
    cfg = OptimizerConfig(name="galore", weight_decay=0.1)
    cfg.galore.target_patterns = ["*.attention.wq.*", "*.feed_forward.w2.*"]
    optimizer = build_optimizer(cfg, model, scales)
    names = {id(p): n for n, p in model.named_parameters()}
    projected = {names[id(p)] for g in optimizer.param_groups if g["projected"] for p in g["params"]}
    assert projected == {f"layers.{i}.{m}.weight" for i in (0, 1) for m in ("attention.wq", "feed_forward.w2")}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert group["lr_scale"] == scales.get(names[id(p)], 1.0)
            assert group["weight_decay"] == (0.0 if p.ndim < 2 or "embedding" in names[id(p)] else 0.1)
    # without a projection predicate the groups are those of adamw, with no `projected` key
    assert all("projected" not in g for g in param_groups(model, 0.1, scales))


def test_patterns_that_match_nothing_are_an_error():
    cfg = OptimizerConfig(name="galore")
    cfg.galore.target_patterns = ["*.nothing.*"]
    with pytest.raises(ValueError, match="target_patterns"):
        build_optimizer(cfg, Llama(TINY))


def test_the_transform_factorises_only_when_the_config_asks():
    logged = []
    dense = JobConfig.load(None, [])
    model = apply_lowrank(Llama(TINY), BuildContext(cfg=dense, env=None, log=logged.append))
    assert not any(isinstance(m, LowRankLinear) for m in model.modules()) and not logged
    factorised = JobConfig.load(None, ["--optimizer.name=lowrank", "--optimizer.lowrank.rank=8"])
    model = apply_lowrank(Llama(TINY), BuildContext(cfg=factorised, env=None, log=logged.append))
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 14
    assert len(logged) == 1 and "low-rank" in logged[0]
    with torch.no_grad():
        assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, TINY.vocab_size)


def test_every_optimizer_name_a_config_accepts_has_a_builder():
    from optim.builder import OPTIMIZERS
    from optim.config import OPTIMIZER_NAMES

    assert sorted(OPTIMIZERS) == sorted(OPTIMIZER_NAMES)
