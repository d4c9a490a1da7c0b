"""Write a wren sentencepiece tokenizer in Hugging Face's format (tokenizer.json + config).

transformers' own `LlamaTokenizer(vocab_file=...)` assumes Llama's sentencepiece settings (a dummy
prefix, normal whitespace handling) and mis-tokenizes wren's code-preserving model, so the fast
tokenizer is assembled here from the model's own vocabulary and merges (read by transformers'
`SentencePieceExtractor`) with the matching pipeline: spaces become "▁" and nothing else is
normalized, "\\n" is split out first, byte fallback covers everything else.
"""

from __future__ import annotations

from pathlib import Path


def save_hf_tokenizer(sentencepiece_model: Path, out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    import sentencepiece

    spm = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    parts = SentencePieceExtractor(str(sentencepiece_model)).extract(BPE)
    unk = spm.id_to_piece(spm.unk_id())
    fast = FastTokenizer(BPE(parts["vocab"], parts["merges"], unk_token=unk, fuse_unk=True, byte_fallback=True))
    fast.normalizer = normalizers.Replace(" ", "▁")
    fast.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    fast.add_tokens(parts["additional_special_tokens"])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=fast,
        bos_token=spm.id_to_piece(spm.bos_id()),
        eos_token=spm.id_to_piece(spm.eos_id()),
        unk_token=unk,
        pad_token=spm.id_to_piece(spm.pad_id()),
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )
    wrapped.save_pretrained(out_dir)
