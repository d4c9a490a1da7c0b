"""LoRAM's method on the module API: recovery against masked full models and dense references,
0% pruning against plain LoRA, QLoRAM's frozen bytes counted."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from models.llama import Llama, LlamaConfig
from models.peft.lora import (
    LoraConfig,
    LoRALinear,
    apply_lora,
    lora_modules,
    merge_lora,
)
from models.peft.loram import (
    LoramState,
    apply_loram,
    frozen_weight_bytes,
    recover_lora_state,
)
from models.peft.loram_config import LoramConfig
from models.peft.nf4 import NF4Linear, NF4LoRALinear
from tests.models.test_prune import CFG, masked_full_logits

ALL_LINEARS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def _ctx(lora: LoraConfig, **loram) -> SimpleNamespace:
    cfg = LoramConfig(**{"keep_first_layers": 1, "keep_last_layers": 0, "prune_ratio": 0.5, **loram})
    return SimpleNamespace(
        cfg=SimpleNamespace(finetune=SimpleNamespace(lora=lora, loram=cfg)), log=lambda *a: None, checkpoint_state={}
    )


def _base(seed: int = 0, config: LlamaConfig = CFG) -> Llama:
    torch.manual_seed(seed)
    return Llama(config)


def _randomise_adapters(model, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_A.normal_(std=0.1)
            module.lora_B.normal_(std=0.1)


def _adapters(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def _merged_full(full: Llama, recovered: dict, scaling: float) -> Llama:
    merged = copy.deepcopy(full)
    with torch.no_grad():
        for key in (k for k in recovered if k.endswith(".lora_A")):
            linear = key[: -len(".lora_A")]
            merged.get_submodule(linear).weight += scaling * recovered[f"{linear}.lora_B"] @ recovered[key]
    return merged


@pytest.mark.parametrize("pruning", ["structured", "random"])
def test_recovered_adapters_reproduce_the_pruned_model_on_the_masked_full_model(pruning):
    full = _base()
    pruned = copy.deepcopy(full)
    ctx = _ctx(LoraConfig(rank=4, alpha=8.0, target_modules=ALL_LINEARS), pruning=pruning)
    apply_loram(pruned, ctx)
    _randomise_adapters(pruned)
    kept = ctx.checkpoint_state["loram"].state_dict()
    recovered = recover_lora_state(_adapters(pruned), kept, full)
    merged = _merged_full(full, recovered, scaling=2.0)
    tokens = torch.randint(0, CFG.vocab_size, (2, 12))
    torch.testing.assert_close(masked_full_logits(merged, kept, tokens), pruned(tokens), rtol=1e-5, atol=1e-5)
    # and without the mask, the pruned structures' deltas are exactly zero (paper section 3, "zeroA")
    for i in (1, 2):
        heads = kept[f"layers.{i}.attention.kv_heads"].tolist()
        channels = kept[f"layers.{i}.feed_forward.channels"].tolist()
        dead_q = [r for h in range(CFG.kv_heads) if h not in heads for r in range(h * 16, (h + 1) * 16)]
        dead_kv = [r for h in range(CFG.kv_heads) if h not in heads for r in range(h * 8, (h + 1) * 8)]
        dead_ch = [j for j in range(CFG.ffn_hidden_dim) if j not in channels]
        def delta(name: str, i: int = i) -> torch.Tensor:
            return merged.get_submodule(f"layers.{i}.{name}").weight - full.get_submodule(f"layers.{i}.{name}").weight

        assert (delta("attention.wq")[dead_q] == 0).all() and (delta("attention.wk")[dead_kv] == 0).all()
        assert (delta("attention.wv")[dead_kv] == 0).all() and (delta("attention.wo")[:, dead_q] == 0).all()
        assert (delta("feed_forward.w1")[dead_ch] == 0).all() and (delta("feed_forward.w2")[:, dead_ch] == 0).all()
        assert (delta("feed_forward.w3")[dead_ch] == 0).all()


def test_recovery_puts_every_trained_entry_at_its_original_position():
    full = _base()
    pruned = copy.deepcopy(full)
    ctx = _ctx(LoraConfig(rank=3, alpha=3.0, target_modules=ALL_LINEARS))
    apply_loram(pruned, ctx)
    _randomise_adapters(pruned)
    kept = ctx.checkpoint_state["loram"].state_dict()
    trained = _adapters(pruned)
    recovered = recover_lora_state(trained, kept, full)
    for i in (1, 2):
        heads, channels = kept[f"layers.{i}.attention.kv_heads"].tolist(), kept[f"layers.{i}.feed_forward.channels"].tolist()
        # dense references built by indexing, position by position
        for name, unit, dim, keep in [("attention.wq", 16, 0, heads), ("attention.wk", 8, 0, heads), ("attention.wv", 8, 0, heads),
                                      ("attention.wo", 16, 1, heads), ("feed_forward.w1", 1, 0, channels),
                                      ("feed_forward.w3", 1, 0, channels), ("feed_forward.w2", 1, 1, channels)]:
            part = "lora_B" if dim == 0 else "lora_A"
            small = trained[f"layers.{i}.{name}.{part}"]
            big = recovered[f"layers.{i}.{name}.{part}"]
            reference = torch.zeros_like(big)
            for position, original in enumerate(keep):
                for offset in range(unit):
                    if dim == 0:
                        reference[original * unit + offset] = small[position * unit + offset]
                    else:
                        reference[:, original * unit + offset] = small[:, position * unit + offset]
            assert torch.equal(big, reference), name
            other = "lora_A" if dim == 0 else "lora_B"
            assert torch.equal(recovered[f"layers.{i}.{name}.{other}"], trained[f"layers.{i}.{name}.{other}"])
    for key in (k for k in trained if k.startswith("layers.0.")):  # the dense layer: unchanged
        assert torch.equal(recovered[key], trained[key])


def _train(model, tokens: torch.Tensor, steps: int = 3) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_zero_pruning_equals_plain_lora():
    lora_cfg = LoraConfig(rank=4, alpha=8.0, target_modules=["wq", "wv", "wo", "w2"])
    full = _base()
    plain, loram = copy.deepcopy(full), copy.deepcopy(full)
    torch.manual_seed(5)
    apply_lora(plain, lora_cfg)
    ctx = _ctx(lora_cfg, prune_ratio=0.0, keep_first_layers=0)
    torch.manual_seed(5)
    apply_loram(loram, ctx)
    tokens = torch.randint(0, CFG.vocab_size, (4, 13))
    assert _train(plain, tokens) == _train(loram, tokens)
    recovered = recover_lora_state(_adapters(loram), ctx.checkpoint_state["loram"].state_dict(), full)
    merged = _merged_full(full, recovered, scaling=2.0)
    merge_lora(plain)
    for name, param in merged.named_parameters():
        torch.testing.assert_close(param, plain.get_parameter(name), rtol=1e-6, atol=1e-7)


def test_semi_structured_keeps_shapes_and_recovery_is_identity():
    full = _base()
    pruned = copy.deepcopy(full)
    ctx = _ctx(LoraConfig(rank=2, alpha=2.0, target_modules=ALL_LINEARS), pruning="semi_structured")
    apply_loram(pruned, ctx)
    _randomise_adapters(pruned)
    trained = _adapters(pruned)
    recovered = recover_lora_state(trained, ctx.checkpoint_state["loram"].state_dict(), full)
    assert recovered.keys() == trained.keys() and all(torch.equal(recovered[k], trained[k]) for k in trained)


QCFG = LlamaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=256, max_seq_len=16)


def test_qloram_stores_the_frozen_block_linears_in_nf4_under_a_third_of_bf16():
    model = _base(config=QCFG)
    ctx = _ctx(LoraConfig(rank=4, alpha=8.0, target_modules=["wq", "wv"]), quantize="nf4", keep_first_layers=0)
    apply_loram(model, ctx)
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(nf4) == 7 * 2 and sum(isinstance(m, NF4LoRALinear) for m in model.modules()) == 2 * 2
    assert not any(type(m) is torch.nn.Linear for m in model.layers.modules())
    stored = sum(t.numel() * t.element_size() for m in nf4 for t in (*m.parameters(), *m.buffers()))
    as_bf16 = sum(2 * m.in_features * m.out_features for m in nf4)
    assert stored <= 0.3 * as_bf16
    assert frozen_weight_bytes(model) == (stored, as_bf16, sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if not p.requires_grad and ".nf4_" not in n
    ))
    tokens = torch.randint(0, QCFG.vocab_size, (2, 9))
    F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        n for n, p in model.named_parameters() if p.requires_grad
    } == {f"layers.{i}.attention.{w}.{p}" for i in range(2) for w in ("wq", "wv") for p in ("lora_A", "lora_B")}


def test_qloram_outputs_stay_within_nf4_error_of_loram():
    base = _base(config=QCFG)
    loram, qloram = copy.deepcopy(base), copy.deepcopy(base)
    lora_cfg = LoraConfig(rank=4, alpha=8.0, target_modules=["wq", "wv"])
    apply_loram(loram, _ctx(lora_cfg, keep_first_layers=0))
    apply_loram(qloram, _ctx(lora_cfg, keep_first_layers=0, quantize="nf4"))
    with torch.no_grad():  # the same adapters on both
        for name, module in lora_modules(qloram):
            module.lora_B.copy_(torch.randn_like(module.lora_B) * 0.05)
            loram.get_submodule(name).lora_A.copy_(module.lora_A)
            loram.get_submodule(name).lora_B.copy_(module.lora_B)
            assert isinstance(loram.get_submodule(name), LoRALinear)
    tokens = torch.randint(0, QCFG.vocab_size, (2, 9))
    exact, quantized = loram(tokens).softmax(-1), qloram(tokens).softmax(-1)
    assert (exact - quantized).abs().max() < 0.05  # 4-bit weights: close, not equal
    assert not torch.equal(exact, quantized)


def test_state_refuses_a_checkpoint_pruned_differently():
    state = LoramState({"layers.1.attention.kv_heads": torch.tensor([0, 2])}, range(1, 3))
    saved = state.state_dict()
    assert set(saved) == {"layers.1.attention.kv_heads", "pruned_layers"}
    state.load_state_dict(saved)
    with pytest.raises(ValueError, match="kv_heads"):
        state.load_state_dict({**saved, "layers.1.attention.kv_heads": torch.tensor([0, 3])})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("prune_ratio", 1.0, "prune_ratio: must be in"),
        ("prune_ratio", "half", "prune_ratio: must be a number"),
        ("pruning", "magnitude", "pruning: must be one of structured, random, semi_structured, unstructured"),
        ("importance", "taylor", "importance: must be one of magnitude"),
        ("quantize", "int8", "quantize: must be one of none, nf4"),
        ("keep_first_layers", -1, "keep_first_layers: must be an integer >= 0"),
        ("semi_structured_n", 4, "semi_structured_n: must be below semi_structured_m=4"),
        ("nf4_block_size", 0, "nf4_block_size: must be an integer >= 1"),
        ("double_quant", "yes", "double_quant: must be true or false"),
    ],
)
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        LoramConfig(**{field: value}).validate()
    LoramConfig().validate()


def test_lora_errors_name_the_lora_table():
    ctx = _ctx(LoraConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match=r"^finetune\.lora\.target_modules"):
        apply_loram(_base(), ctx)


def test_full_model_loads_from_a_hugging_face_directory(tmp_path):
    import transformers

    from models.peft.loram import load_full_model

    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path)
    full = load_full_model(SimpleNamespace(finetune=SimpleNamespace(init_from=str(tmp_path))))
    tokens = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(full(tokens), reference(tokens).logits, rtol=1e-5, atol=1e-5)
