"""Published laws for the optimal peak learning rate and batch size, looked up by name.

Each law is a function `fn(scale) -> Prediction` registered with `@register_law(name)`. `Scale`
holds what a law may read: N, D, the sequence length and, when a config supplied it, the model's
shape. Every constant cites its paper; the comments say how each was checked (paper text, the
authors' code or data, or arithmetic against a table of the paper).

What N means differs between papers, so each law says which count it needs:

* Step Law and Kaplan: non-embedding parameters, the weight matrices of the transformer blocks
  (no token embedding, no output head, tied or not; norm gains are left out as the Step Law code
  does). This is `Scale.n_params`.
* Porian et al.: those plus the output head (vocab x d_model), i.e. every matmul weight.
* DeepSeek: not a parameter count but non-embedding FLOPs per token, M = 6 N + 12 n_layer d l_seq.

This module imports nothing heavy (no torch), so `wren hparams --params ... --tokens ...` is fast.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable


@dataclass(frozen=True, kw_only=True)
class Scale:
    """The inputs of a prediction.

    Attributes:
        n_params: N, non-embedding parameters (block weight matrices; no embedding, head or norms).
        tokens: D, training tokens.
        seq_len: tokens per sequence, to express batches in sequences.
        n_layers, dim, vocab_size: the model's shape when known (from a config); DeepSeek's
            attention FLOPs need n_layers and dim, Porian's N adds the vocab_size x dim head.
        loss: the final loss (nats/token) the user expects; only Kaplan's critical batch reads it.
    """

    n_params: float
    tokens: float
    seq_len: int = 2048
    n_layers: int | None = None
    dim: int | None = None
    vocab_size: int | None = None
    loss: float | None = None

    @property
    def has_shape(self) -> bool:
        return self.n_layers is not None and self.dim is not None


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """One law's answer. `lr` or `batch_tokens` is None where the law does not give it.

    `applicable` is False when the law cannot answer for these inputs at all; `extrapolated` is
    True when the inputs lie outside the range the law was fitted on (the answer is then a guess).
    """

    law: str
    lr: float | None
    batch_tokens: float | None
    seq_len: int
    formula: str
    source: str
    applicable: bool = True
    extrapolated: bool = False
    note: str = ""

    @property
    def batch_sequences(self) -> float | None:
        """The batch in sequences of `seq_len` tokens (fractional; rounding is the caller's)."""
        return None if self.batch_tokens is None else self.batch_tokens / self.seq_len

    def to_dict(self) -> dict:
        return {**asdict(self), "batch_sequences": self.batch_sequences}


LAWS: dict[str, Callable[[Scale], Prediction]] = {}


def register_law(name: str):
    """Decorator that adds `fn(scale) -> Prediction` to the registry under `name`."""

    def wrap(fn):
        LAWS[name] = fn
        return fn

    return wrap


def predict(scale: Scale, laws: list[str] | None = None) -> list[Prediction]:
    """Predictions of the named laws (all registered laws, Step Law first, by default)."""
    names = list(LAWS) if not laws else laws
    unknown = [n for n in names if n not in LAWS]
    if unknown:
        raise KeyError(f"unknown law {unknown[0]!r}; known: {', '.join(LAWS)}")
    return [LAWS[n](scale) for n in names]


def _outside(value: float, low: float, high: float) -> bool:
    return not low <= value <= high


# --- Step Law: Li et al. (StepFun) 2025, "Predictable Scale: Part I", arXiv 2503.04715 ---------
# eta_opt(N, D) = 1.79 N^-0.713 D^0.307 and B_opt(D) = 0.58 D^0.571 (B in tokens), the constants
# printed in the paper's main text (the abstract gives none; the body is not in the search index, so
# they are taken from the reference dossier and checked against an independent re-use of the law,
# an sldbench evaluation script: lr = 1.79 N**-0.713 D**0.307, bs = 0.58 D**0.571 / 2048
# sequences). N is non-embedding: the authors' fit_tool.py computes M = 6*(4h + 3*ffnh + 2*seq)*L*h,
# i.e. 6 * L(4h^2 + 3 h ffnh) + attention, so N = L(4h^2 + 3 h d_ff) (attention q,k,v,o + SwiGLU),
# no embedding, head or norms. B is tokens per optimizer step: fit_tool.py converts `bs*seq_len`.
# The official CLI (`fit_tool.py pred-opt-lr-bs`) predicts with the mean of its 1000 bootstrap fits
# (read in fit_tool.py); those means (e^0.58631 = 1.7973, -0.71292, 0.30749; e^-0.54354 = 0.58069,
# 0.57094, from the dossier: the CSV is not in the index) give a ~1.8 % higher lr. wren uses the
# paper's printed constants, so its numbers are citable.
STEP_LR_COEF = 1.79
STEP_LR_N_EXP = -0.713
STEP_LR_D_EXP = 0.307
STEP_BATCH_COEF = 0.58
STEP_BATCH_D_EXP = 0.571
# The dense grid the law was fitted on (per the reference dossier's reading of the repo's
# data/dense_lr_bs_loss.csv; that file is not in the search index, so not re-read here).
STEP_N_RANGE = (2.15e8, 1.07e9)
STEP_D_RANGE = (4e9, 1e11)


@register_law("step_law")
def step_law(s: Scale) -> Prediction:
    lr = STEP_LR_COEF * s.n_params**STEP_LR_N_EXP * s.tokens**STEP_LR_D_EXP
    batch = STEP_BATCH_COEF * s.tokens**STEP_BATCH_D_EXP
    extrapolated = _outside(s.n_params, *STEP_N_RANGE) or _outside(s.tokens, *STEP_D_RANGE)
    return Prediction(
        law="step_law",
        lr=lr,
        batch_tokens=batch,
        seq_len=s.seq_len,
        formula="lr = 1.79 N^-0.713 D^0.307; B = 0.58 D^0.571 tokens (N non-embedding)",
        source='Li et al. 2025, "Predictable Scale: Part I" (Step Law), arXiv 2503.04715, main text',
        extrapolated=extrapolated,
        note=(
            "peak lr of AdamW decayed to a fixed min lr 1e-5; fitted on N 2.15e8-1.07e9, "
            "D 4e9-1e11 (seq_len 2048); the positive D exponent of lr may not carry over to WSD"
        ),
    )


# --- DeepSeek LLM: Bi et al. 2024, arXiv 2401.02954 -----------------------------------------------
# Eq. (1): eta_opt = 0.3118 C^-0.1250, B_opt = 0.2920 C^0.3271 (B in tokens), fitted on compute
# budgets 1e17-2e19 FLOPs; C = M D with M the non-embedding FLOPs per token, Eq. (2):
# M = 72 n_layer d_model^2 + 12 n_layer d_model l_seq. The 12 (not 6) of the attention term is read
# in two independent transcriptions of Eq. (2) and in StepFun's fit_tool.py (12 L h seq), and it
# reproduces the paper's Table 3 ratios 6N1/M = 0.43 (8 layers, d 512) and 0.92 (80 layers, d 8192)
# at l_seq = 4096 (with 6 they would be 0.60 and 0.96). 72 n_layer d^2 = 6 * 12 n_layer d^2 is 6N
# for a standard block; wren generalises it to 6 N with N counted from the actual (GQA, SwiGLU) shape.
DEEPSEEK_LR_COEF = 0.3118
DEEPSEEK_LR_EXP = -0.1250
DEEPSEEK_BATCH_COEF = 0.2920
DEEPSEEK_BATCH_EXP = 0.3271
DEEPSEEK_C_RANGE = (1e17, 2e19)


def deepseek_flops_per_token(s: Scale) -> float:
    """DeepSeek's M: 6 N + 12 n_layer d l_seq, or 6 N alone when the shape is unknown."""
    attention = 12.0 * s.n_layers * s.dim * s.seq_len if s.has_shape else 0.0
    return 6.0 * s.n_params + attention


@register_law("deepseek")
def deepseek(s: Scale) -> Prediction:
    compute = deepseek_flops_per_token(s) * s.tokens
    note = "fitted on C = 1e17-2e19 FLOPs (multi-step lr schedule)"
    if not s.has_shape:
        note += "; shape unknown, so M = 6N without the 12 n_layer d l_seq attention term (give a config)"
    return Prediction(
        law="deepseek",
        lr=DEEPSEEK_LR_COEF * compute**DEEPSEEK_LR_EXP,
        batch_tokens=DEEPSEEK_BATCH_COEF * compute**DEEPSEEK_BATCH_EXP,
        seq_len=s.seq_len,
        formula="lr = 0.3118 C^-0.125; B = 0.2920 C^0.3271 tokens; C = M D, M = 6N + 12 n_layer d l_seq",
        source="Bi et al. 2024, DeepSeek LLM, arXiv 2401.02954, Eq. (1) and (2)",
        extrapolated=_outside(compute, *DEEPSEEK_C_RANGE),
        note=f"C = {compute:.3g} FLOPs; {note}",
    )


# --- Porian et al. 2024, "Resolving Discrepancies in Compute-Optimal Scaling", arXiv 2406.19146 ---
# eta* = 3.7 N^-0.36 and B* = 0.00037 N^0.703 sequences of 2048 tokens (= 0.75776 N^0.703 tokens),
# fitted on their per-size sweep at the compute-optimal ~20 tokens per parameter; D is not an input.
# Checked against the authors' repo (formll/resolving-scaling-law-discrepancies): N is `params` =
# flops_per_token / 6 with flops_per_token = 6 * ((4w + 3 d_ff) w depth + vocab w) (data.py), i.e.
# the blocks plus the output head; batches are sequences of seq_len 2048 (analysis.fetch_flop); the
# power laws are fitted over 2.5e7 < N < 1.1e8 (get_interpolated_hparams_dfs); and the tuned values
# in make_paper.ipynb (e.g. N = 57,384,960: lr 5.9e-3, bs 104) match 3.7 N^-0.36 = 5.95e-3 and
# 0.00037 N^0.703 = 104.6 within a few per cent.
PORIAN_LR_COEF = 3.7
PORIAN_LR_EXP = -0.36
PORIAN_BATCH_SEQ_COEF = 0.00037
PORIAN_SEQ_LEN = 2048
PORIAN_BATCH_EXP = 0.703
PORIAN_N_RANGE = (2.5e7, 1.1e8)
PORIAN_TOKENS_PER_PARAM = 20.0


@register_law("porian")
def porian(s: Scale) -> Prediction:
    if s.vocab_size is not None and s.dim is not None:
        n = s.n_params + s.vocab_size * s.dim
        n_note = f"N incl. head = {n:.3g}"
    else:
        n = s.n_params
        n_note = "head size unknown, so N excludes the vocab x d head Porian counts (give a config)"
    ratio = s.tokens / n
    off_ratio = not 0.5 * PORIAN_TOKENS_PER_PARAM <= ratio <= 2 * PORIAN_TOKENS_PER_PARAM
    return Prediction(
        law="porian",
        lr=PORIAN_LR_COEF * n**PORIAN_LR_EXP,
        batch_tokens=PORIAN_BATCH_SEQ_COEF * PORIAN_SEQ_LEN * n**PORIAN_BATCH_EXP,
        seq_len=s.seq_len,
        formula="lr = 3.7 N^-0.36; B = 0.00037 N^0.703 seqs of 2048 = 0.7578 N^0.703 tokens (N incl. head)",
        source="Porian et al. 2024 (NeurIPS), arXiv 2406.19146, optimal lr and batch fits",
        extrapolated=_outside(n, *PORIAN_N_RANGE) or off_ratio,
        note=(
            f"{n_note}; fitted on N 2.5e7-1.1e8 at ~20 tokens/param (D is ignored; here D/N = {ratio:.3g}), "
            "AdamW with tuned beta2"
        ),
    )


# --- Kaplan et al. 2020, "Scaling Laws for Neural Language Models", arXiv 2001.08361 --------------
# Learning rate, appendix D.6, Eq. (D.1): LR(N) ~ 0.003239 - 0.0001395 log(N), N non-embedding
# ("excluding all vocabulary and positional embeddings", Sec. 1.3). The log is natural: that is the
# only reading consistent with the paper's runs (3.5e-4 at N = 1e9, 6.9e-4 at 8.5e7; log10 would
# give ~2e-3 at every size). Not re-read in a primary copy (none in the search index). The fit is
# for Kaplan's schedule (3000-step warmup, cosine to zero over 2.5e5 steps of 512 x 1024 tokens)
# and turns negative above N = exp(0.003239 / 0.0001395) = 1.2e10.
# Batch, Eq. (1.4): B_crit(L) = B* / L^(1/alpha_B), B* ~ 2e8 tokens, alpha_B ~ 0.21: the critical
# batch at loss L (nats/token on WebText2), the time/compute trade-off point, not an N-D optimum.
KAPLAN_LR_INTERCEPT = 0.003239
KAPLAN_LR_SLOPE = -0.0001395
KAPLAN_B_STAR = 2e8
KAPLAN_ALPHA_B = 0.21
KAPLAN_N_RANGE = (768.0, 1.5e9)


@register_law("kaplan")
def kaplan(s: Scale) -> Prediction:
    lr = KAPLAN_LR_INTERCEPT + KAPLAN_LR_SLOPE * math.log(s.n_params)
    notes = ["fitted on N 768-1.5e9 with Kaplan's fixed schedule and batch"]
    if lr <= 0:
        notes.insert(0, "the lr fit is <= 0 for N > 1.2e10, so it gives no learning rate here")
    if s.loss is None:
        batch = None
        notes.append("gives a critical batch B_crit(L) of the loss reached, not of N or D: pass --loss L")
    else:
        batch = KAPLAN_B_STAR * s.loss ** (-1.0 / KAPLAN_ALPHA_B)
        notes.append(f"B is the critical batch at loss {s.loss:g} nats/token (WebText2 scale), not an optimum")
    return Prediction(
        law="kaplan",
        lr=lr if lr > 0 else None,
        batch_tokens=batch,
        seq_len=s.seq_len,
        formula="lr = 0.003239 - 0.0001395 ln N; B_crit = 2e8 L^(-1/0.21) tokens at loss L",
        source="Kaplan et al. 2020, arXiv 2001.08361, Eq. (D.1) and (1.4)",
        applicable=lr > 0 or batch is not None,
        extrapolated=_outside(s.n_params, *KAPLAN_N_RANGE),
        note="; ".join(notes),
    )
