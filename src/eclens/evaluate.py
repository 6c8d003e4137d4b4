"""Whole-sentence scoring: log-probs of sentences and BLiMP-style accuracy.

BLiMP counts a minimal pair as correct when the model gives the good sentence a
higher total log-probability than the bad one (Warstadt et al., 2020). Models whose
tokenizer prepends no BOS (SmolLM2) would leave the first token unscored, which
would hide every pair that differs in its first word; we therefore condition on a
document-start token (``<|endoftext|>`` where the vocabulary has it, else BOS, else
EOS), as language-model evaluations of GPT-2 do.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from .errors import EclensError
from .hooks import pad_id


def document_start_id(tokenizer) -> int | None:
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    return tokenizer.eos_token_id


@torch.inference_mode()
def sentence_logprobs(model, sentences: Sequence[str], batch_size: int = 64, prefix_id: int | None = -1) -> list[float]:
    """Total log-probability of each sentence given a document-start token.

    ``prefix_id=-1`` picks :func:`document_start_id`; ``None`` scores from the second token.
    """
    tok = model.tokenizer
    if prefix_id == -1:
        prefix_id = document_start_id(tok)
    ids = [list(tok(s, add_special_tokens=False)["input_ids"]) for s in sentences]
    if prefix_id is not None:
        ids = [[prefix_id, *x] for x in ids]
    device = next(model.parameters()).device
    out = [math.nan] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pid = pad_id(model)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        T = max(len(ids[i]) for i in idx)
        if T < 2:
            for i in idx:
                out[i] = 0.0
            continue
        toks = torch.full((len(idx), T), pid, dtype=torch.long)
        mask = torch.zeros((len(idx), T - 1), dtype=torch.bool)
        for r, i in enumerate(idx):
            toks[r, : len(ids[i])] = torch.tensor(ids[i])
            mask[r, : len(ids[i]) - 1] = True
        toks = toks.to(device)
        logp = model(toks).float().log_softmax(-1)[:, :-1]
        lp = logp.gather(-1, toks[:, 1:, None])[..., 0].cpu()
        tot = (lp * mask).sum(-1)
        for r, i in enumerate(idx):
            out[i] = float(tot[r])
    return out


def read_blimp_paradigm(path: Path, n: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                rows.append({"good": d["sentence_good"], "bad": d["sentence_bad"], "UID": d["UID"],
                             "linguistics_term": d["linguistics_term"], "field": d.get("field", "")})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise EclensError(f"{path}:{i}: not a BLiMP record ({type(e).__name__}: {e})") from None
            if n is not None and len(rows) >= n:
                break
    return rows


def blimp_accuracy(model, blimp_dir: str | Path, n_per_paradigm: int | None = None,
                   batch_size: int = 64, progress=None) -> pd.DataFrame:
    """Per-paradigm accuracy (good log-prob > bad log-prob) on the first ``n`` pairs of each file."""
    files = sorted(Path(blimp_dir).glob("*.jsonl"))
    if not files:
        raise EclensError(f"{blimp_dir}: no BLiMP *.jsonl files found")
    recs = []
    for f in files:
        rows = read_blimp_paradigm(f, n_per_paradigm)
        lp = sentence_logprobs(model, [r["good"] for r in rows] + [r["bad"] for r in rows], batch_size)
        good, bad = lp[: len(rows)], lp[len(rows):]
        correct = sum(g > b for g, b in zip(good, bad))
        recs.append({"UID": rows[0]["UID"], "linguistics_term": rows[0]["linguistics_term"],
                     "field": rows[0]["field"], "n": len(rows), "correct": correct,
                     "accuracy": correct / len(rows)})
        if progress is not None:
            progress(f.stem)
    return pd.DataFrame(recs)


def load_reference_results(path: str | Path) -> pd.DataFrame:
    """BLiMP's published per-paradigm results (``models_summary.jsonl``: ngram, lstm, txl, gpt2)."""
    return pd.read_json(path, lines=True)
