"""The exported Hugging Face tokenizer encodes and decodes exactly like wren's sentencepiece model."""

import sysconfig
from pathlib import Path

from data.hf_tokenizer import save_hf_tokenizer
from data.tokenizer import Tokenizer, train_tokenizer


def test_fast_tokenizer_matches_sentencepiece_on_real_code(tmp_path):
    from transformers import AutoTokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((stdlib / "json").glob("*.py")) + sorted((stdlib / "email").glob("*.py"))
    texts = [f.read_text(encoding="utf-8") for f in files]
    model = train_tokenizer(texts[::2], vocab_size=1000, out_prefix=tmp_path / "sp")
    save_hf_tokenizer(model, tmp_path)
    sp = Tokenizer.load(model)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    # Odd files were not seen in training; the extra string exercises byte fallback and whitespace.
    for text in texts[1::2] + ['s = "héllo 世界 🐍"\n\tif  x:\n        pass  # ▁\n']:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text)
        assert hf.decode(ids) == sp.decode(ids)
    assert hf.eos_token_id == sp.eos_id and hf.bos_token_id == sp.bos_id
