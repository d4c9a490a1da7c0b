"""`wren compose BASE DELTA [DELTA ...] -o OUT`: add sparse fine-tunings to a base model.

LT-SFT's composition (Ansell et al. 2022, section 3; `SFT.apply` in cambridgeltl/composable-sft):
theta = theta_0 + phi_1 + phi_2 + ... . BASE is a Hugging Face Llama directory (config.json plus
*.safetensors, e.g. the output of `wren export-hf`); each DELTA is a sparse delta file written by a
SpIEL or LT-SFT run (`<run_dir>/sparse_delta.safetensors`, wren parameter names) or any file in
that format. OUT gets every file of BASE, with the targeted weights of each safetensors file
replaced by base + sum of deltas (summed in fp64, cast back once, so the order of the deltas does
not matter); `transformers` and `finetune.init_from` load it like the base.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from trainer.errors import UserError

__all__ = ["add_arguments", "compose", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `BASE DELTA [DELTA ...] -o OUT`."""
    parser.add_argument("base", help="Hugging Face Llama directory (config.json + *.safetensors), e.g. from `wren export-hf`")
    parser.add_argument("deltas", nargs="+", help="sparse delta files (.safetensors) written by SpIEL / LT-SFT runs")
    parser.add_argument("-o", "--output", required=True, help="directory to write the composed model to (must not exist)")


def _hf_names(base: Path) -> dict[str, str]:
    """wren parameter name -> Hugging Face name for the Llama described by `base`/config.json."""
    import torch
    import transformers

    from models.llama import Llama
    from models.llama.hf_adapter import from_hf_config, to_hf_state_dict

    try:
        cfg = from_hf_config(transformers.LlamaConfig.from_pretrained(base))
    except (OSError, ValueError) as err:
        raise UserError(f"compose: {base}/config.json: {err}") from None
    with torch.device("meta"):
        keys = [name for name, _ in Llama(cfg).named_parameters()]
    renamed = to_hf_state_dict({key: key for key in keys}, cfg)  # values are the wren names
    return {wren: hf for hf, wren in renamed.items()}


def compose(base: str | Path, delta_paths: list[str | Path], output: str | Path) -> Path:
    """Write `output`: `base` with every delta file added; returns `output`. Problems are `UserError`s."""
    from safetensors.torch import load_file, save_file

    from models.peft.sparse_delta import add_sparse_deltas, load_sparse_deltas

    base, output = Path(base), Path(output)
    if not (base / "config.json").is_file() or not list(base.glob("*.safetensors")):
        raise UserError(f"compose: {base} is not a Hugging Face model directory (config.json + *.safetensors)")
    if output.exists():
        raise UserError(f"compose: output {output} already exists; choose a new directory")
    try:
        model_type = json.loads((base / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"compose: {base}/config.json is unreadable: {err}") from None
    if model_type != "llama":
        raise UserError(f"compose: {base} holds a {model_type!r} model; compose supports Llama")
    to_hf = _hf_names(base)
    delta_sets = []
    for path in delta_paths:
        try:
            deltas = load_sparse_deltas(path)
        except (ValueError, FileNotFoundError) as err:
            raise UserError(f"compose: {err}") from None
        unknown = [name for name in deltas if name not in to_hf and name not in to_hf.values()]
        if unknown:
            raise UserError(f"compose: {path}: {unknown[0]!r} is not a weight of the base model")
        delta_sets.append({to_hf.get(name, name): delta for name, delta in deltas.items()})

    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(base, staging, ignore=shutil.ignore_patterns("*.safetensors"))
    try:
        for file in sorted(base.glob("*.safetensors")):
            tensors = load_file(str(file))
            add_sparse_deltas(tensors, *[{n: d for n, d in deltas.items() if n in tensors} for deltas in delta_sets])
            save_file(tensors, str(staging / file.name), metadata={"format": "pt"})
    except ValueError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"compose: {err}") from None
    staging.rename(output)
    return output


def run(args: argparse.Namespace, extra_args: list[str]) -> int:
    """`wren compose`: compose, then print what was written."""
    if extra_args:
        raise UserError(f"compose: unexpected arguments {' '.join(extra_args)}")
    out = compose(args.base, args.deltas, args.output)
    print(f"wren: composed {len(args.deltas)} delta file(s) onto {args.base} -> {out}")
    return 0
