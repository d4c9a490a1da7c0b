"""Loading a Hugging Face Llama shard by shard: on 2 gloo ranks the sharded wren model gives the
logits of `transformers.LlamaForCausalLM.from_pretrained`, each rank holds about half of the
parameters, and `fill_parameter_` gives each rank its rows of a global tensor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.distributed import run_on_ranks

VOCAB, SEQ = 96, 12


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny Llama saved by transformers in several safetensors files with an index."""
    import transformers

    directory = tmp_path_factory.mktemp("hf_llama")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory, max_shard_size="40KB")
    assert len(list(directory.glob("*.safetensors"))) >= 2
    assert (directory / "model.safetensors.index.json").is_file()
    return directory


def _load_and_run(init_from: str) -> dict:
    """Build the fine-tuning model ("full") from `init_from` as the trainer does; logits of a fixed probe."""
    from models import get_model_spec
    from trainer.config import JobConfig
    from trainer.distributed import init_distributed, world_size_from_env
    from trainer.extensions import BuildContext
    from trainer.finetune_build import (
        build_finetune_model,
        pretrained_model_config,
        pretrained_source,
    )
    from trainer.metrics import parameter_bytes

    torch.set_num_threads(1)
    overrides = ['--finetune.method="full"', f'--finetune.init_from="{init_from}"', "--training.seq_len=16"]
    cfg = JobConfig.load(None, overrides, world_size=world_size_from_env())
    env = init_distributed(cfg.parallel)
    source = pretrained_source(cfg)
    model_config = pretrained_model_config(source)
    ctx = BuildContext(cfg=cfg, env=env, log=lambda *a, **k: None)
    model = build_finetune_model(cfg, env, ctx, get_model_spec("llama"), source, model_config)
    param_bytes = parameter_bytes(model)  # before the forward, which leaves the root unit gathered
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens)
    return {"logits": logits.numpy(), "param_bytes": param_bytes, "filled": _filled_rows(env.mesh)}


def _filled_rows(mesh) -> np.ndarray:
    """This rank's part of a 7 x 4 weight (FSDP2-sharded when `mesh` is set) filled by `fill_parameter_`."""
    from models.llama import parallelize_llama
    from models.peft.pretrained import fill_parameter_

    layer = torch.nn.Sequential(torch.nn.Linear(4, 7, bias=False))
    parallelize_llama(layer, mesh)
    fill_parameter_(layer[0].weight, torch.arange(28, dtype=torch.float32).reshape(7, 4))
    weight = layer[0].weight
    return (weight.to_local() if hasattr(weight, "to_local") else weight).detach().numpy()


@pytest.mark.parametrize("world_size", [1, 2])
def test_sharded_load_matches_transformers(hf_dir, world_size):
    from transformers import LlamaForCausalLM

    if world_size == 1:
        results = [_load_and_run(str(hf_dir))]
    else:
        results = run_on_ranks(_load_and_run, 2, str(hf_dir))
        # fill_parameter_ gave each rank its rows of a global tensor (7 rows: 4 + 3 under FSDP2).
        np.testing.assert_array_equal(np.concatenate([r["filled"] for r in results]), np.arange(28.0).reshape(7, 4))
    hf = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits.numpy()
    total_bytes = 4 * sum(p.numel() for p in hf.parameters())
    for result in results:
        np.testing.assert_allclose(result["logits"], want, rtol=0, atol=1e-5)
        assert abs(result["param_bytes"] - total_bytes / world_size) <= 0.02 * total_bytes, (result["param_bytes"], total_bytes)


def test_missing_tensor_is_named(hf_dir, tmp_path):
    from trainer.errors import UserError

    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    for path in hf_dir.iterdir():
        (tmp_path / path.name).symlink_to(path)
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="model.norm.weight"):
        _load_and_run(str(tmp_path))
