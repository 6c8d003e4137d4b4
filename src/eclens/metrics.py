"""Patching metrics for one-token minimal pairs.

Every metric is computed from log-softmax of the logits: in compatibility mode the
unembedding is centred, so raw logits carry a per-position constant that log-probs
do not. A metric maps one run's log-probs to one number per row; the clean and the
corrupt run of a pair give the two reference values, and any patched run is placed
between them by :func:`fraction_restored`.

The metrics (``p`` is the changed position, ``T`` the length):

``logit_diff``
    ``log p(target_clean) - log p(target_corrupt)`` at the target position ``q``.
    A causal model's prediction at ``p - 1`` never sees position ``p``, so it is the
    same number in the clean, the corrupt and every patched run: it is the model's
    preference for the clean token (``pref_clean``, a per-pair constant, BLiMP's
    judgement) but cannot measure a patch. The patchable logit difference is read
    at ``q >= p``:

    * the pair's own targets, ``meta["target_clean"]`` / ``meta["target_corrupt"]``
      (the first token of each), at the last token of ``meta["prefix"]`` (or, with
      no prefix, at the last token of the sentence), when that position is ``>= p``;
    * otherwise the *answers* at ``q = p`` (the first position that sees the
      change): the clean run's most likely next token against the corrupt run's
      (its runner-up where both runs agree on the top token), as in
      Heimersheim & Nanda (2024). A BLiMP one-prefix pair, whose prefix ends at
      ``p - 1``, keeps its targets as ``pref_clean`` and uses the answers.

``logprob``
    Teacher-forced log-prob of the sentence's tokens after ``p`` (shared by both
    sentences): ``sum_{t=p}^{T-2} log p_t(x_{t+1})``. The full-sentence difference
    ``log P(clean) - log P(corrupt)`` equals ``pref_clean + (logprob_clean -
    logprob_corrupt)``; only the second part can change under patching. NaN when
    ``p`` is the last token.

``kl``
    Mean over positions ``t = p..T-1`` of ``KL(P_clean,t || P_run,t)`` of the
    next-token distributions ("downstream KL"); 0 for the clean run.

Fraction restored (0 = the corrupt run's value, 1 = the clean run's)::

    restored = (m_patched - m_corrupt) / (m_clean - m_corrupt)

The same formula serves both directions. Denoising (clean activation into the
corrupt run): how much of the clean behaviour the patch brings back. Noising
(corrupt activation into the clean run): how much clean behaviour survives, so
``1 - restored`` is the fraction the patch destroys (the ``*_effect`` columns of
the patch tables use ``restored`` for denoising and ``1 - restored`` for noising).
Where ``|m_clean - m_corrupt| < min_delta`` the ratio is noise: it is NaN and the
callers count such cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from .pairs import AlignedPair, encode

METRICS = ("logit_diff", "logprob", "kl")
DEFAULT_MIN_DELTA = 0.01  # nats; below this the clean and corrupt runs are indistinguishable for a ratio


def log_probs(logits: Float[torch.Tensor, "... vocab"]) -> Float[torch.Tensor, "... vocab"]:
    """Log-softmax in float32 (half-precision log-softmax loses the small differences we measure)."""
    return torch.log_softmax(logits.float(), dim=-1)


def logit_diff(
    lp: Float[torch.Tensor, "batch seq vocab"], position: int, target_clean: int, target_corrupt: int
) -> Float[torch.Tensor, " batch"]:
    """``log p(target_clean) - log p(target_corrupt)`` at ``position``."""
    return lp[:, position, target_clean] - lp[:, position, target_corrupt]


def suffix_logprob(
    lp: Float[torch.Tensor, "batch seq vocab"], tokens: Int[torch.Tensor, " seq"], start: int
) -> Float[torch.Tensor, " batch"]:
    """``sum_{t=start}^{T-2} log p_t(tokens[t+1])``; NaN when there is no such ``t``."""
    T = int(tokens.shape[0])
    if start >= T - 1:
        return torch.full((lp.shape[0],), float("nan"), device=lp.device)
    nxt = tokens[start + 1 : T].to(lp.device)
    picked = lp[:, start : T - 1].gather(-1, nxt.view(1, -1, 1).expand(lp.shape[0], -1, 1))
    return picked.squeeze(-1).sum(-1)


def sentence_logprob(lp: Float[torch.Tensor, "batch seq vocab"], tokens: Int[torch.Tensor, " seq"]) -> torch.Tensor:
    """Teacher-forced log-prob of ``tokens[1:]`` (the first token has no prediction)."""
    return suffix_logprob(lp, tokens, 0)


def downstream_kl(
    lp_ref: Float[torch.Tensor, "seq vocab"], lp: Float[torch.Tensor, "batch seq vocab"], start: int
) -> Float[torch.Tensor, " batch"]:
    """Mean over ``t >= start`` of ``KL(ref_t || run_t)``."""
    ref = lp_ref[start:].unsqueeze(0)
    run = lp[:, start:]
    return (ref.exp() * (ref - run)).sum(-1).mean(-1)


def fraction_restored(m, m_clean, m_corrupt, min_delta: float = DEFAULT_MIN_DELTA):
    """``(m - m_corrupt) / (m_clean - m_corrupt)``, NaN where the denominator is below ``min_delta``.

    Works on floats, numpy arrays and tensors (broadcasting).
    """
    denom = m_clean - m_corrupt
    if isinstance(denom, float | int):
        return (m - m_corrupt) / denom if abs(denom) >= min_delta and not math.isnan(denom) else float("nan")
    import numpy as np

    if isinstance(denom, torch.Tensor):
        ok = denom.abs() >= min_delta
        return torch.where(ok, (m - m_corrupt) / torch.where(ok, denom, torch.ones_like(denom)),
                           torch.full_like(denom, float("nan")))
    denom = np.asarray(denom, dtype=float)
    ok = np.abs(denom) >= min_delta
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, (np.asarray(m, dtype=float) - m_corrupt) / np.where(ok, denom, 1.0), np.nan)


def _first_token_after(tokenizer, prefix: str, target: str, prepend_bos: bool) -> int | None:
    """The token a model reading ``prefix`` should predict for the word ``target``.

    Tokenises ``prefix + target`` jointly (a space between them unless one side has
    it) so the target gets the leading-space form it has in running text.
    """
    if not target or not target.strip():
        return None
    pre = encode(tokenizer, prefix, prepend_bos)
    sep = "" if (not prefix or prefix[-1].isspace() or target[0].isspace()) else " "
    full = encode(tokenizer, prefix + sep + target, prepend_bos)
    if full[: len(pre)] == pre and len(full) > len(pre):
        return int(full[len(pre)])
    alone = encode(tokenizer, sep + target, False)  # the tokenizer merged across the boundary
    return int(alone[0]) if alone else None


def meta_targets(pair: AlignedPair, tokenizer, prepend_bos: bool = False) -> tuple[int, int, int] | None:
    """``(position, target_clean_id, target_corrupt_id)`` from the pair's meta, or ``None``.

    The position is the last token of ``meta["prefix"]`` (the whole clean sentence
    when there is no prefix).
    """
    meta = pair.pair.meta or {}
    tc, tk = meta.get("target_clean"), meta.get("target_corrupt")
    if not isinstance(tc, str) or not isinstance(tk, str):
        return None
    prefix = meta.get("prefix")
    prefix = prefix if isinstance(prefix, str) and prefix.strip() else pair.pair.clean
    q = len(encode(tokenizer, prefix, prepend_bos)) - 1
    a = _first_token_after(tokenizer, prefix, tc, prepend_bos)
    b = _first_token_after(tokenizer, prefix, tk, prepend_bos)
    if a is None or b is None or a == b or not 0 <= q < pair.length:
        return None
    return q, a, b


@dataclass
class PairMetrics:
    """Everything needed to score any run of one pair: targets, suffix tokens, clean reference.

    Built by :func:`prepare_pair` from the clean and the corrupt run's logits; then
    :meth:`evaluate` scores a batch of (patched) runs of the same length.
    """

    pair: AlignedPair
    ld_position: int
    target_clean: int
    target_corrupt: int
    ld_source: str  # "meta" or "answers"
    tokens: Int[torch.Tensor, " seq"]  # the clean sentence (positions > p are shared with the corrupt one)
    lp_clean_tail: Float[torch.Tensor, "tail vocab"]  # clean log-probs at positions start..T-1
    start: int  # first position any metric reads
    clean: dict[str, float]
    corrupt: dict[str, float]
    pref_clean: float  # log p(clean token) - log p(corrupt token) before p: constant under patching
    sentence_logprob_clean: float
    sentence_logprob_corrupt: float

    @property
    def position(self) -> int:
        return self.pair.position

    def evaluate(self, logits: Float[torch.Tensor, "batch seq vocab"]) -> dict[str, torch.Tensor]:
        """The metrics of each row of ``logits`` (rows are runs of this pair; extra positions ignored)."""
        T = self.pair.length
        lp = log_probs(logits[:, self.start : T])
        return self.evaluate_log_probs(lp)

    def evaluate_log_probs(self, lp_tail: Float[torch.Tensor, "batch tail vocab"]) -> dict[str, torch.Tensor]:
        s = self.start
        p = self.position
        toks = self.tokens[s:]
        return {
            "logit_diff": logit_diff(lp_tail, self.ld_position - s, self.target_clean, self.target_corrupt),
            "logprob": suffix_logprob(lp_tail, toks, p - s),
            "kl": downstream_kl(self.lp_clean_tail.to(lp_tail.device), lp_tail, p - s),
        }

    def restored(self, name: str, value, min_delta: float = DEFAULT_MIN_DELTA):
        return fraction_restored(value, self.clean[name], self.corrupt[name], min_delta)

    def valid(self, name: str, min_delta: float = DEFAULT_MIN_DELTA) -> bool:
        d = self.clean[name] - self.corrupt[name]
        return not math.isnan(d) and abs(d) >= min_delta

    def baseline_row(self, tokenizer=None) -> dict:
        row = {
            "pair_id": self.pair.id, "category": self.pair.category, "position": self.position,
            "length": self.pair.length, "clean_token": self.pair.clean_token,
            "corrupt_token": self.pair.corrupt_token, "ld_source": self.ld_source,
            "ld_position": self.ld_position,
            "target_clean": tokenizer.decode([self.target_clean]) if tokenizer else self.target_clean,
            "target_corrupt": tokenizer.decode([self.target_corrupt]) if tokenizer else self.target_corrupt,
            "pref_clean": self.pref_clean,
            "sentence_logprob_clean": self.sentence_logprob_clean,
            "sentence_logprob_corrupt": self.sentence_logprob_corrupt,
        }
        for m in METRICS:
            row[f"{m}_clean"] = self.clean[m]
            row[f"{m}_corrupt"] = self.corrupt[m]
        return row


def prepare_pair(
    pair: AlignedPair,
    logits_clean: Float[torch.Tensor, "seq vocab"],
    logits_corrupt: Float[torch.Tensor, "seq vocab"],
    tokenizer=None,
    prepend_bos: bool = False,
) -> PairMetrics:
    """Targets and reference values for ``pair`` from its clean and corrupt runs' logits."""
    T, p = pair.length, pair.position
    lp_c = log_probs(logits_clean[:T])
    lp_k = log_probs(logits_corrupt[:T])
    clean_ids = torch.tensor(pair.clean_ids, dtype=torch.long)
    corrupt_ids = torch.tensor(pair.corrupt_ids, dtype=torch.long)
    tok_c, tok_k = pair.clean_ids[p], pair.corrupt_ids[p]
    mt = meta_targets(pair, tokenizer, prepend_bos) if tokenizer is not None else None
    if mt is not None and mt[0] < p:
        pref = float(lp_c[mt[0], mt[1]] - lp_c[mt[0], mt[2]])
    else:
        pref = float(lp_c[p - 1, tok_c] - lp_c[p - 1, tok_k]) if p >= 1 else float("nan")
    if mt is not None and mt[0] >= p:
        q, t_c, t_k = mt
        source = "meta"
    else:
        q = p
        t_c = int(lp_c[p].argmax())
        order = lp_k[p].topk(2).indices.tolist()
        t_k = order[0] if order[0] != t_c else order[1]
        source = "answers"
    start = min(p, q)
    both = torch.stack([lp_c[start:], lp_k[start:]])
    ctx = PairMetrics(
        pair=pair, ld_position=q, target_clean=int(t_c), target_corrupt=int(t_k), ld_source=source,
        tokens=clean_ids, lp_clean_tail=lp_c[start:].clone(), start=start, clean={}, corrupt={},
        pref_clean=pref,
        sentence_logprob_clean=float(sentence_logprob(lp_c.unsqueeze(0), clean_ids)[0]),
        sentence_logprob_corrupt=float(sentence_logprob(lp_k.unsqueeze(0), corrupt_ids)[0]),
    )
    vals = ctx.evaluate_log_probs(both)
    ctx.clean = {k: float(v[0]) for k, v in vals.items()}
    ctx.corrupt = {k: float(v[1]) for k, v in vals.items()}
    ctx.clean["kl"] = 0.0  # exactly, not a float-rounding residue
    return ctx
