"""Instruction / chat data: JSONL conversations tokenised with a loss mask on the responses.

Each line of a JSONL file is one example, either

    {"prompt": "...", "response": "..."}
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

(a prompt/response pair is the conversation [user: prompt, assistant: response]). The text is
rendered by a template and tokenised with the run's tokenizer; every token of an assistant turn
(its content and the end-of-turn token after it) is a *response token*, everything else (system
and user turns, role headers) is context. Training predicts only response tokens: the loader's
loss mask is 1 exactly where the target token is a response token, and the trainer ignores the
other targets (labels -100).

Templates (`template`):
- "wren": the plain template below, the same for every tokenizer, with the tokenizer's BOS at
  the start of the example and its EOS ending every assistant turn:

      <bos>### System:\\n{content}\\n\\n### User:\\n{content}\\n\\n### Assistant:\\n{content}<eos>\\n\\n...

- "auto" (default): the Hugging Face tokenizer's own chat template when the run starts from a
  Hugging Face directory whose tokenizer has one, "wren" otherwise. Response tokens are then
  found by rendering the conversation up to and including each assistant turn.

Examples are packed: tokenised examples are concatenated (each ends with EOS) into one stream,
which the ordinary `TokenLoader` cuts into `seq_len` windows, so no compute is spent on padding;
attention crosses example boundaries, as in plain packed pretraining. The mask is a second
token shard (ids 0 / 1) beside the token shard, read through the same window positions, so the
loader's global, resumable token cursor is unchanged. Whole examples are held out for evaluation
(`val_fraction`, at least one). The result is cached by a fingerprint of the files' contents,
the template and the tokenizer, under `data.cache_dir`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ChatDataConfig", "ChatTokenizer", "PreparedChat", "prepare_chat", "read_conversations", "tokenize_conversation"]

TEMPLATES = ("auto", "wren")
ROLES = ("system", "user", "assistant")
_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
CHAT_FORMAT_VERSION = 1


@dataclass(kw_only=True)
class ChatDataConfig:
    """The `[finetune.chat]` section: instruction data with the loss on responses only.

    Attributes:
        paths: JSONL files (or directories of *.jsonl); empty = train on `[data]` instead.
        template: "auto" (the Hugging Face tokenizer's chat template when there is one) or "wren".
        val_fraction: fraction of examples held out for evaluation (at least one example).
        seed: seed of the example shuffle that decides the split and the packing order.
    """

    paths: list[str] = field(default_factory=list)
    template: str = "auto"
    val_fraction: float = 0.05
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        for path in self.paths:
            if not Path(path).exists():
                raise ValueError(f"paths: {path!r} does not exist")
        if self.template not in TEMPLATES:
            raise ValueError(f"template: must be one of {', '.join(TEMPLATES)}, got {self.template!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be greater than 0 and less than 1, got {self.val_fraction}")
        if self.seed < 0:
            raise ValueError(f"seed: must be non-negative, got {self.seed}")

    def files(self) -> list[Path]:
        """The JSONL files `paths` names, directories expanded (sorted)."""
        out: list[Path] = []
        for path in map(Path, self.paths):
            out.extend(sorted(path.glob("*.jsonl")) if path.is_dir() else [path])
        return out


def read_conversations(path: Path) -> Iterator[list[dict[str, str]]]:
    """The conversations of one JSONL file as lists of {"role", "content"}; ValueError names file and line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON: {err}") from None
            yield _conversation(record, where)


def _conversation(record: Any, where: str) -> list[dict[str, str]]:
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                raise ValueError(f"{where}: every message needs a role ({', '.join(ROLES)}) and a string content")
    elif isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    else:
        raise ValueError(f"{where}: expected {{\"prompt\", \"response\"}} or {{\"messages\": [...]}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class ChatTokenizer:
    """The run's tokenizer as chat data needs it: `encode`, BOS/EOS ids, and an optional chat template.

    Wraps either wren's sentencepiece `data.tokenizer.Tokenizer` or a Hugging Face tokenizer (a
    directory loaded with `AutoTokenizer`); `identity` is a digest of the tokenizer files, part of
    the cache key.
    """

    def __init__(self, encode: Callable[[str], list[int]], *, bos_id: int, eos_id: int, vocab_size: int,
                 identity: str, hf_tokenizer: Any = None) -> None:
        self.encode = encode
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self.identity = identity
        self.hf_tokenizer = hf_tokenizer

    @classmethod
    def from_sentencepiece(cls, path: Path) -> ChatTokenizer:
        """wren's sentencepiece model at `path` (no chat template)."""
        from data.tokenizer import Tokenizer

        sp = Tokenizer.load(path)
        return cls(sp.encode, bos_id=sp.bos_id, eos_id=sp.eos_id, vocab_size=sp.vocab_size, identity=_digest([Path(path)]))

    @classmethod
    def from_hf(cls, directory: Path) -> ChatTokenizer:
        """The Hugging Face tokenizer of `directory` (its chat template, when it has one, is used by "auto")."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(directory)
        if tok.eos_token_id is None:
            raise ValueError(f"{directory}: the tokenizer has no EOS token to end responses")
        files = sorted(p for p in Path(directory).iterdir() if p.name.startswith(("tokenizer", "special_tokens")) or p.suffix == ".jinja")
        return cls(
            lambda text: tok.encode(text, add_special_tokens=False),
            bos_id=-1 if tok.bos_token_id is None else tok.bos_token_id,
            eos_id=tok.eos_token_id,
            vocab_size=len(tok),
            identity=_digest(files),
            hf_tokenizer=tok,
        )

    def template_for(self, template: str) -> str:
        """The template actually used: "hf" for "auto" with a Hugging Face chat template, else "wren"."""
        has_hf = self.hf_tokenizer is not None and getattr(self.hf_tokenizer, "chat_template", None)
        return "hf" if template == "auto" and has_hf else "wren"


def _digest(files: list[Path]) -> str:
    sha = hashlib.sha256()
    for path in files:
        sha.update(path.name.encode())
        sha.update(path.read_bytes())
    return sha.hexdigest()


def tokenize_conversation(messages: list[dict[str, str]], tokenizer: ChatTokenizer, template: str) -> tuple[list[int], list[int]]:
    """(token ids, response mask) of one conversation; the ids end with EOS.

    `template` is "wren" or "hf" (see `ChatTokenizer.template_for`). mask[i] = 1 exactly when
    ids[i] belongs to an assistant turn (its content and the EOS / end-of-turn tokens closing it).
    """
    if template == "hf":
        ids, mask = _hf_template(messages, tokenizer.hf_tokenizer)
    else:
        ids, mask = _wren_template(messages, tokenizer)
    if not ids or ids[-1] != tokenizer.eos_id:
        ids, mask = ids + [tokenizer.eos_id], mask + [0]
    return ids, mask


def _wren_template(messages: list[dict[str, str]], tokenizer: ChatTokenizer) -> tuple[list[int], list[int]]:
    ids: list[int] = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    mask: list[int] = [0] * len(ids)

    def add(tokens: list[int], is_response: bool) -> None:
        ids.extend(tokens)
        mask.extend([int(is_response)] * len(tokens))

    for message in messages:
        if message["role"] == "assistant":
            add(tokenizer.encode(_HEADERS["assistant"]), False)
            add(tokenizer.encode(message["content"]) + [tokenizer.eos_id], True)
            add(tokenizer.encode("\n\n"), False)
        else:
            add(tokenizer.encode(_HEADERS[message["role"]] + message["content"] + "\n\n"), False)
    return ids, mask


def _render(hf_tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _hf_template(messages: list[dict[str, str]], hf_tokenizer: Any) -> tuple[list[int], list[int]]:
    """The tokenizer's chat template; assistant turn i spans render(messages[:i] + prompt) .. render(messages[:i+1])."""
    ids = _render(hf_tokenizer, messages, False)
    mask = [0] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(hf_tokenizer, messages[:index], True) if index else []
        through = _render(hf_tokenizer, messages[: index + 1], False)
        if ids[: len(through)] != through or through[: len(before)] != before:
            raise ValueError("the tokenizer's chat template does not render conversations prefix by prefix; use template = \"wren\"")
        mask[len(before) : len(through)] = [1] * (len(through) - len(before))
    return ids, mask


@dataclass(frozen=True)
class PreparedChat:
    """Token and response-mask shards of the train and held-out examples."""

    directory: Path
    train_path: Path
    val_path: Path
    train_mask_path: Path
    val_mask_path: Path
    vocab_size: int


def _cache_key(cfg: ChatDataConfig, tokenizer: ChatTokenizer, template: str) -> str:
    files = [{"path": str(p.resolve()), "sha256": _digest([p])} for p in cfg.files()]
    inputs = {"format": CHAT_FORMAT_VERSION, "files": files, "template": template, "tokenizer": tokenizer.identity,
              "val_fraction": cfg.val_fraction, "seed": cfg.seed}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def prepare_chat(cfg: ChatDataConfig, tokenizer: ChatTokenizer, cache_dir: str | Path, log: Callable[[str], None] = print) -> PreparedChat:
    """Tokenise, split and pack the chat data of `cfg` (cached under `cache_dir` by content)."""
    from data.shards import write_shard

    template = tokenizer.template_for(cfg.template)
    final = Path(cache_dir) / f"chat-{_cache_key(cfg, tokenizer, template)[:16]}"
    if not final.exists():
        conversations = [c for path in cfg.files() for c in read_conversations(path)]
        if len(conversations) < 2:
            raise ValueError(f"paths: {len(conversations)} examples; need at least 2 (one is held out)")
        order = np.random.default_rng(cfg.seed).permutation(len(conversations))
        num_val = max(1, round(cfg.val_fraction * len(conversations)))
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".building-chat-", dir=cache_dir))
        try:
            for split, indices in (("val", order[:num_val]), ("train", order[num_val:])):
                encoded = [tokenize_conversation(conversations[i], tokenizer, template) for i in indices]
                write_shard(staging / split, (np.asarray(ids) for ids, _ in encoded), tokenizer.vocab_size)
                write_shard(staging / f"{split}_mask", (np.asarray(mask) for _, mask in encoded), 2)
            try:
                os.rename(staging, final)
            except OSError:
                if not final.exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log(f"data: chat data ({template} template): {len(conversations) - num_val} train, {num_val} held-out examples in {final}")
    else:
        log(f"data: using cached chat data at {final}")
    return PreparedChat(final, final / "train", final / "val", final / "train_mask", final / "val_mask", tokenizer.vocab_size)
