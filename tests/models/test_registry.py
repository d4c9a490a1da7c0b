"""The model registry and the "llama" spec the trainer builds from."""

from __future__ import annotations

import dataclasses

import pytest

import models
from models import ModelSpec, get_model_spec
from models.llama import Llama, LlamaConfig, parallelize_llama


def test_llama_spec_is_registered_with_its_parts():
    spec = get_model_spec("llama")
    assert spec.config_cls is LlamaConfig and spec.model_cls is Llama
    assert spec.parallelize is parallelize_llama
    assert set(spec.flavors) == {"tiny", "small", "125M", "1B", "8B"}
    assert all(isinstance(cfg, LlamaConfig) for cfg in spec.flavors.values())
    for name in ("to_hf_config", "from_hf_config", "to_hf_state_dict", "from_hf_state_dict"):
        assert callable(getattr(spec.hf_adapter, name))
    assert "llama" in models.registered_models()


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="^unknown model 'x'; known: based, lizard, llama$"):
        get_model_spec("x")


def test_duplicate_registration_is_refused():
    spec = dataclasses.replace(get_model_spec("llama"))
    assert isinstance(spec, ModelSpec)
    with pytest.raises(ValueError, match="'llama' is already registered"):
        models.register_model(spec)


def test_flavor_shapes():
    flavors = get_model_spec("llama").flavors
    tiny, one_b, eight_b = flavors["tiny"], flavors["1B"], flavors["8B"]
    assert (tiny.dim, tiny.n_layers, tiny.n_heads, tiny.kv_heads, tiny.ffn_hidden_dim) == (256, 4, 4, 2, 688)
    assert tiny.tie_embeddings and tiny.max_seq_len == 1024
    assert (one_b.dim, one_b.n_layers, one_b.n_heads, one_b.kv_heads, one_b.ffn_hidden_dim) == (2048, 16, 32, 8, 8192)
    assert one_b.tie_embeddings and one_b.rope_theta == 500000.0 and one_b.rope_scaling_factor == 32.0
    assert (eight_b.dim, eight_b.n_layers, eight_b.kv_heads, eight_b.ffn_hidden_dim) == (4096, 32, 8, 14336)
    assert not eight_b.tie_embeddings and eight_b.rope_scaling_factor == 8.0


def test_recipes_load_without_torch_and_name_the_real_attention_kinds():
    """Reading a recipe (model registry, flavors, config validation) imports no torch: `wren hparams` answers fast.

    Runs in a fresh interpreter, since this one has torch loaded already.
    """
    import subprocess
    import sys

    probe = (
        "import sys, models\n"
        "from models.attention.params import ATTENTION_KIND_NAMES\n"
        "for name in models.registered_models():\n"
        "    for flavor in models.get_model_spec(name).flavors.values(): flavor.validate()\n"
        "assert 'torch' not in sys.modules, 'reading model configs imported torch'\n"
        "print(','.join(ATTENTION_KIND_NAMES))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    from models.attention import ATTENTION_KINDS

    assert out.strip().split(",") == list(ATTENTION_KINDS)
