"""`wren compose BASE DELTA1 DELTA2 -o OUT`: the output is the base plus both deltas (oracle: dense
scatter-add in fp64), loads in transformers with the logits of a wren model holding the same
weights, does not depend on the order of the deltas, and bad inputs are one-line user errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from models.llama import Llama, LlamaConfig
from models.llama.hf_adapter import to_hf_config, to_hf_state_dict
from models.peft.sparse_delta import save_sparse_deltas
from trainer.cli import main

CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=48, max_seq_len=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("compose")
    torch.manual_seed(0)
    model = Llama(CFG)
    hf = AutoModelForCausalLM.from_config(to_hf_config(CFG))
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), CFG), strict=False)
    hf.save_pretrained(root / "base", safe_serialization=True)
    generator = torch.Generator().manual_seed(1)
    files = []
    for i, names in enumerate([["layers.0.attention.wq.weight", "layers.1.feed_forward.w2.weight"], ["layers.0.attention.wq.weight"]]):
        deltas = {}
        for name in names:
            shape = tuple(model.get_parameter(name).shape)
            indices = torch.randperm(shape[0] * shape[1], generator=generator)[:40]
            deltas[name] = (indices, torch.randn(40, generator=generator) * 0.1, shape)
        files.append(save_sparse_deltas(root / f"delta{i}.safetensors", deltas))
    return root, model, files


def test_compose_adds_deltas_in_any_order_and_loads(setup):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from models.peft.sparse_delta import load_sparse_deltas

    root, model, (first, second) = setup
    assert main(["compose", str(root / "base"), str(first), str(second), "-o", str(root / "ab")]) == 0
    assert main(["compose", str(root / "base"), str(second), str(first), "-o", str(root / "ba")]) == 0
    ab, ba = load_file(str(root / "ab" / "model.safetensors")), load_file(str(root / "ba" / "model.safetensors"))
    assert ab.keys() == ba.keys() and all(torch.equal(ab[k], ba[k]) for k in ab)

    expected = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for path in (first, second):  # oracle: dense scatter-add, entry by entry
        for name, (indices, values, shape) in load_sparse_deltas(path).items():
            flat = expected[name].view(-1)
            for i, v in zip(indices.tolist(), values.tolist()):
                flat[i] += v
    wren = Llama(CFG)
    wren.load_state_dict({n: t.float() for n, t in expected.items()})
    hf_expected = to_hf_state_dict(wren.state_dict(), CFG)
    for name, tensor in ab.items():
        assert torch.equal(tensor, hf_expected[name]), name
    assert not torch.equal(ab["model.layers.0.self_attn.q_proj.weight"], to_hf_state_dict(model.state_dict(), CFG)["model.layers.0.self_attn.q_proj.weight"])

    hf = AutoModelForCausalLM.from_pretrained(root / "ab", torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, wren(tokens), rtol=1e-5, atol=1e-5)


def test_compose_user_errors_are_one_line(setup, tmp_path, capsys):
    root, _, (first, _) = setup
    bad = save_sparse_deltas(tmp_path / "bad.safetensors", {"layers.9.attention.wq.weight": (torch.tensor([0]), torch.tensor([1.0]), (32, 32))})
    cases = [
        ([str(tmp_path), str(first)], "not a Hugging Face model directory"),
        ([str(root / "base"), str(bad)], "is not a weight of the base model"),
        ([str(root / "base"), str(tmp_path / "missing.safetensors")], "missing.safetensors"),
    ]
    out = tmp_path / "out"
    # The first case through the real entry point in a fresh interpreter (nothing else reaches
    # stderr); the others through the same `main` in this process (one interpreter start, not three).
    args, message = cases[0]
    result = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "compose", *args, "-o", str(out)], check=False, capture_output=True, text=True, timeout=120
    )
    outcomes = [(result.returncode, result.stderr, message)]
    capsys.readouterr()
    for args, message in cases[1:]:
        code = main(["compose", *args, "-o", str(out)])
        outcomes.append((code, capsys.readouterr().err, message))
    for code, stderr, message in outcomes:
        assert code == 1, stderr
        assert message in stderr and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()
