"""`wren generate`: sampling rules, cached generation against a loop over the full forward, and
the command's user errors."""

from __future__ import annotations

import pytest
import torch

from models.based import Based, BasedConfig
from models.llama import Llama, LlamaConfig
from trainer.cli import main
from trainer.generate import generate, sample_next

LLAMA = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, ffn_hidden_dim=96, max_seq_len=64)
BASED = BasedConfig(
    dim=32, n_layers=5, n_heads=2, vocab_size=40, ffn_hidden_dim=64, feature_dim=4,
    linear_attention_layers=[1], sliding_window_layers=[2], window_tokens=4, chunk_size_tokens=8, max_seq_len=64,
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_greedy_and_top_k_sampling():
    logits = torch.tensor([[0.1, 2.0, 1.5, -1.0], [3.0, 0.0, 0.5, 2.9]])
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=0, top_k=0, generator=gen).tolist() == [1, 0]
    assert sample_next(logits, temperature=1.0, top_k=1, generator=gen).tolist() == [1, 0]
    draws = torch.stack([sample_next(logits, temperature=1.0, top_k=2, generator=gen) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 2} and set(draws[:, 1].tolist()) == {0, 3}
    # Without top-k every token appears; the empirical frequency follows softmax(logits / T).
    draws = torch.stack([sample_next(logits[:1], temperature=2.0, top_k=0, generator=gen) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 2.0, -1), atol=0.03, rtol=0)
    again = [sample_next(logits, temperature=1.0, top_k=0, generator=torch.Generator().manual_seed(5)).tolist() for _ in range(2)]
    assert again[0] == again[1]


@pytest.mark.parametrize("build", [lambda: Llama(LLAMA), lambda: Based(BASED)], ids=["llama-kv-cache", "based-state"])
def test_greedy_generation_equals_argmax_over_the_full_forward(build):
    torch.manual_seed(0)
    model = build().eval()
    prompt = [3, 7, 1, 9, 4]
    got = generate(model, prompt, max_new_tokens=20, temperature=0)
    context = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            context.append(int(model(torch.tensor([context]))[0, -1].argmax()))
    assert got == context[len(prompt):]


def test_generation_stops_at_the_stop_id():
    torch.manual_seed(0)
    model = Llama(LLAMA).eval()
    free = generate(model, [1, 2, 3], max_new_tokens=10, temperature=0)
    stopped = generate(model, [1, 2, 3], max_new_tokens=10, temperature=0, stop_id=free[2])
    assert stopped == free[: free.index(free[2]) + 1]


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 1
    assert "is not a wren run directory" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "x", "--max-new-tokens", "0"]) == 1
    assert "--max-new-tokens: must be at least 1" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "x", "--bogus"]) == 1
    assert "unknown arguments --bogus" in capsys.readouterr().err


def test_attention_override_keeps_the_weights():
    from trainer.errors import UserError
    from trainer.generate import _with_attention

    torch.manual_seed(0)
    model = Llama(LLAMA)
    hyper = _with_attention(model, "hyper")
    assert hyper.config.attention == "hyper"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), hyper.state_dict().values()))
    tokens = torch.randint(0, 40, (1, 16))
    torch.testing.assert_close(hyper(tokens), model(tokens))  # below hyper_min_seq_len: exact
    with pytest.raises(UserError, match="--attention: attention: must be one of"):
        _with_attention(model, "nope")
    with pytest.raises(UserError, match="has no attention kind"):
        _with_attention(Based(BASED), "hyper")
