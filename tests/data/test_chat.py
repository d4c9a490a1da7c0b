"""Chat data: the response mask covers exactly the assistant turns (wren template and a Hugging Face
chat template), masked targets contribute nothing to the loss or its gradient, the split keeps
whole examples, and a resumed loader continues the (tokens, mask) stream."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from data.chat import (
    ChatDataConfig,
    ChatTokenizer,
    prepare_chat,
    read_conversations,
    tokenize_conversation,
)
from data.loader import TokenLoader, eval_windows
from data.shards import TokenShard

CONVERSATION = [
    {"role": "system", "content": "You answer in code."},
    {"role": "user", "content": "def add(a, b):"},
    {"role": "assistant", "content": "    return a + b"},
    {"role": "user", "content": "and the total?"},
    {"role": "assistant", "content": "total = count + 1"},
]


def _runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The maximal runs of consecutive ids whose mask is 1."""
    runs, current = [], []
    for token, bit in zip(ids, mask):
        if bit:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.fixture
def sp_chat(small_tokenizer) -> ChatTokenizer:
    return ChatTokenizer.from_sentencepiece(small_tokenizer.path)


def test_wren_template_masks_exactly_the_responses(small_tokenizer, sp_chat):
    ids, mask = tokenize_conversation(CONVERSATION, sp_chat, "wren")
    assert len(ids) == len(mask) and ids[-1] == small_tokenizer.eos_id
    responses = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    runs = _runs(ids, mask)
    assert len(runs) == len(responses)
    for run, response in zip(runs, responses):
        assert run[-1] == small_tokenizer.eos_id  # the turn's end is trained, so the model learns to stop
        assert run[:-1] == small_tokenizer.encode(response)
    context = small_tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    for message in CONVERSATION:
        assert (message["content"] in context) == (message["role"] != "assistant")


def test_hf_chat_template_masks_exactly_the_responses(small_tokenizer, tmp_path):
    from data.hf_tokenizer import save_hf_tokenizer

    save_hf_tokenizer(small_tokenizer.path, tmp_path)
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    chat = ChatTokenizer.from_hf(tmp_path)
    assert chat.template_for("auto") == "hf" and chat.template_for("wren") == "wren"
    ids, mask = tokenize_conversation(CONVERSATION, chat, "hf")
    runs = _runs(ids, mask)
    responses = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [chat.hf_tokenizer.decode(run) for run in runs] == [r + chat.hf_tokenizer.eos_token for r in responses]


def test_masked_targets_contribute_nothing():
    from models.llama import Llama, LlamaConfig
    from trainer.train import IGNORE_INDEX, next_token_targets

    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=50, ffn_hidden_dim=64, max_seq_len=16))
    tokens = torch.randint(0, 50, (2, 13))
    mask = (torch.rand(2, 13) < 0.5).long()
    logits = model(tokens[:, :-1])
    logits.retain_grad()
    targets = next_token_targets(tokens, mask)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    response = mask[:, 1:].bool()
    assert torch.all(logits.grad[~response] == 0)
    assert torch.all(logits.grad[response].abs().sum(-1) > 0)
    # The oracle: the mean negative log-likelihood of the response targets alone.
    log_probs = torch.log_softmax(logits.detach(), -1)
    want = -log_probs[response].gather(-1, tokens[:, 1:][response][:, None]).mean()
    assert torch.allclose(loss.detach(), want, atol=1e-6)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prepare_split_cache_and_resumed_loader(sp_chat, tmp_path):
    records = [{"prompt": f"question {i}?", "response": f"answer {i} " * (1 + i % 3)} for i in range(30)]
    records += [{"messages": CONVERSATION}]
    path = _write_jsonl(tmp_path / "chat.jsonl", records)
    cfg = ChatDataConfig(paths=[str(path)], template="wren", val_fraction=0.1)
    prepared = prepare_chat(cfg, sp_chat, tmp_path / "cache", log=lambda *_: None)
    train, val = TokenShard(prepared.train_path), TokenShard(prepared.val_path)
    train_mask = TokenShard(prepared.train_mask_path)
    assert train.num_documents + val.num_documents == len(records) and val.num_documents == 3
    # Every example is one document: tokenised whole, its mask beside it.
    expected = {tuple(tokenize_conversation(c, sp_chat, "wren")[0]) for c in read_conversations(path)}
    for shard in (train, val):
        for i in range(shard.num_documents):
            assert tuple(shard.document(i)) in expected
    again = prepare_chat(cfg, sp_chat, tmp_path / "cache", log=lambda *_: None)
    assert again.directory == prepared.directory

    def loader():
        return TokenLoader(train, seq_len=16, global_batch_size=4, shuffle_seed=3, mask_shard=train_mask)

    straight = loader()
    batches = [straight.next_batch() for _ in range(7)]
    for tokens, mask in batches:
        assert tokens.shape == mask.shape == (4, 17) and set(mask.unique().tolist()) <= {0, 1}
    first = loader()
    for _ in range(3):
        first.next_batch()
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    for want in batches[3:]:
        got = resumed.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    (tokens, mask), *_ = eval_windows(val, seq_len=8, batch_size=2, max_batches=1, mask_shard=TokenShard(prepared.val_mask_path))
    assert tokens.shape == mask.shape


def test_bad_records_are_named(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": "r"}, {"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*no assistant turn"):
        list(read_conversations(path))
