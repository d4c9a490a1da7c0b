"""LoRA through `wren train` from a wren pretrained run: 2 gloo ranks equal 1 process, only the
adapters train (and hold optimizer state), the frozen weights are the pretrained ones, and a
resumed run continues bit-identically."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_on_ranks
from tests.trainer.finetune_jobs import (
    branch,
    finetune_job,
    finetune_jobs,
    losses_after,
    pretrained_base,
)
from tests.trainer.jobs import losses, tiny_overrides
from trainer.export_hf import load_model_from_run


@pytest.fixture(scope="module")
def base_run(corpus, data_cache, tmp_path_factory):
    """A few steps of pretraining: the checkpoint every fine-tuning test starts from."""
    return pretrained_base(corpus, data_cache, tmp_path_factory)


def finetune_overrides(corpus, data_cache, root, name, base, **extra):
    """A tiny LoRA fine-tuning job on `[data]` starting from run `base`."""
    values = {"finetune__method": "lora", "finetune__init_from": str(base), "finetune__lora__rank": 4, "optimizer__lr": 1e-2}
    values.update(extra)
    return tiny_overrides(corpus, data_cache, root, name, **values)


def write_chat(path):
    """A small instruction set: prompt/response pairs and one multi-turn conversation."""
    import json

    records = [{"prompt": f"def f{i}(x):", "response": f"    return x + {i}  # add {i}\n" * (1 + i % 4)} for i in range(60)]
    records.append({"messages": [{"role": "system", "content": "Write Python."}, {"role": "user", "content": "import"},
                                 {"role": "assistant", "content": "import os"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def chat_extra(tmp_path_factory):
    """Overrides of the chat runs: a small instruction set (loss on responses only), 3 steps."""
    chat = write_chat(tmp_path_factory.mktemp("chat") / "chat.jsonl")
    return {"finetune__chat__paths": [str(chat)], "finetune__chat__val_fraction": 0.2, "training__steps": 3}


@pytest.fixture(scope="module")
def two_ranks(corpus, data_cache, tmp_path_factory, base_run, chat_extra):
    """The 2-rank runs of this file (LoRA on `[data]`, LoRA on chat data) in one launch of the
    ranks: (runs root, run name -> rank 0's report)."""
    root = tmp_path_factory.mktemp("two_ranks")
    runs = {"lora": {}, "chat": chat_extra}
    jobs = [finetune_overrides(corpus, data_cache, root, name, base_run, **extra) for name, extra in runs.items()]
    return root, dict(zip(runs, run_on_ranks(finetune_jobs, 2, jobs)[0]))


@pytest.mark.slow
def test_lora_two_ranks_match_one_rank_and_train_only_adapters(corpus, data_cache, tmp_path, base_run, two_ranks):
    root, reports = two_ranks
    single = finetune_job(finetune_overrides(corpus, data_cache, tmp_path, "one", base_run))
    sharded = reports["lora"]

    one, two = losses(tmp_path / "one"), losses(root / "lora")
    assert sorted(one) == sorted(two) == list(range(1, 11))
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-5 * abs(one[step]), (step, one[step], two[step])

    for result in (single, sharded):
        assert result["trainable"] and all(n.endswith((".lora_A", ".lora_B")) for n in result["trainable"])
        assert result["with_state"] == sorted(result["trainable"])

    base, _, _ = load_model_from_run(base_run)  # the oracle: the pretrained run's own weights
    base_weights = {name: p.detach() for name, p in base.named_parameters()}
    for result in (single, sharded):
        assert set(result["frozen"]) == set(base_weights)
        for name, value in result["frozen"].items():
            assert torch.equal(torch.from_numpy(value), base_weights[name]), name


def test_lora_resume_continues_exactly(corpus, data_cache, tmp_path, base_run):
    common = {"checkpoint__every_steps": 3, "training__steps": 6, "schedule__name": "constant"}
    finetune_job(finetune_overrides(corpus, data_cache, tmp_path, "reference", base_run, **common))
    branch(tmp_path / "reference", tmp_path / "resumed", 3)  # as if "resumed" had stopped after step 3
    finetune_job(finetune_overrides(corpus, data_cache, tmp_path, "resumed", base_run, **common))
    assert losses(tmp_path / "resumed") == losses_after(tmp_path / "reference", 3)


@pytest.mark.slow
def test_chat_from_wren_run_and_hugging_face_dir_on_one_and_two_ranks(corpus, data_cache, tmp_path, base_run, chat_extra, two_ranks):
    """Chat data (loss on responses only) trains identically on 1 and 2 ranks, and from the base run
    exported to Hugging Face (its safetensors, its tokenizer) exactly as from the wren run itself."""
    from trainer.export_hf import export_hf

    root, _ = two_ranks
    hf_dir = export_hf(base_run, tmp_path / "base_hf")
    finetune_job(finetune_overrides(corpus, data_cache, tmp_path, "one", base_run, **chat_extra))
    finetune_job(finetune_overrides(corpus, data_cache, tmp_path, "from_hf", hf_dir, **chat_extra))
    want = losses(tmp_path / "one")
    assert sorted(want) == [1, 2, 3]
    for name, run_dir in (("two", root / "chat"), ("from_hf", tmp_path / "from_hf")):
        got = losses(run_dir)
        assert sorted(got) == sorted(want), name
        for step in want:
            assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (name, step, want[step], got[step])


@pytest.mark.slow
def test_export_merged_and_peft_adapter(corpus, data_cache, tmp_path, base_run):
    import argparse

    import peft
    import transformers

    import trainer.export_hf as export_command
    from trainer.export_hf import export_hf, merge_peft_

    finetune_job(finetune_overrides(corpus, data_cache, tmp_path, "lora", base_run, training__steps=3, optimizer__lr=5e-2))
    export_hf(tmp_path / "lora", tmp_path / "merged")
    parser = argparse.ArgumentParser()
    export_command.add_arguments(parser)  # `wren export-hf RUN OUT --adapter`
    assert export_command.run(parser.parse_args([str(tmp_path / "lora"), str(tmp_path / "adapter"), "--adapter"]), []) == 0
    export_hf(base_run, tmp_path / "base_hf")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    wren, _, _ = load_model_from_run(tmp_path / "lora")
    wren.eval()
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = wren(tokens)
        base_logits = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf").eval()(tokens).logits
        merged_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(tokens).logits
        base_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf")
        with_adapter = peft.PeftModel.from_pretrained(base_hf, tmp_path / "adapter").eval()(tokens).logits
        merged_wren = merge_peft_(wren)(tokens)
    assert (unmerged - base_logits).abs().max() > 1e-3  # the adapters trained
    torch.testing.assert_close(with_adapter, unmerged, rtol=0, atol=1e-5)  # peft is the oracle of wren's LoRA
    torch.testing.assert_close(merged_hf, merged_wren, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged_hf, with_adapter, rtol=0, atol=1e-4)
