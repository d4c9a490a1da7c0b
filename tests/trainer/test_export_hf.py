"""`wren export-hf` writes safetensors that transformers loads and that give wren's logits."""

import subprocess
import sys

import torch

from tests.trainer.jobs import tiny_overrides
from trainer.export_hf import load_model_from_run


def test_export_loads_in_transformers_with_equal_logits(corpus, data_cache, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "train", *tiny_overrides(corpus, data_cache, tmp_path, "exp", training__steps=3)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    out = tmp_path / "hf"
    export = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "export-hf", str(tmp_path / "exp"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert export.returncode == 0, export.stderr
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data import Tokenizer

    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    wren, _, _ = load_model_from_run(tmp_path / "exp")
    wren.eval()
    tokens = torch.randint(0, wren.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(tokens).logits - wren(tokens)).abs().max().item()
    assert diff <= 1e-5, diff

    text = "def add(a, b):\n    return a + b  # sum\n"
    sp = Tokenizer.load(out / "tokenizer.model")
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
