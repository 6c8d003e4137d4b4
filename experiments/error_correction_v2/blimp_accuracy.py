"""BLiMP accuracy per paradigm with cluster-bootstrap intervals, beside BLiMP's own GPT-2 results.

A pair is correct when the good sentence's total log-prob beats the bad one's
(:func:`eclens.evaluate.sentence_logprobs`; BOS policy: each sentence is scored after the model's
document-start token, the same for both sentences). Pairs of one paradigm that differ in the same
words form one cluster (the study's cluster for BLiMP), so a paradigm's interval resamples clusters.
The ``overall`` row is the unweighted mean over paradigms, as BLiMP's ``models_summary.jsonl``
reports GPT-2's 0.830; its interval resamples clusters within every paradigm.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

N_BOOT = 1000


def _clusters(rows: list[dict]) -> list[str]:
    from eclens.sources.blimp import differing_words

    return [f"{r['UID']}|{'/'.join(differing_words(r['good'], r['bad']))}" for r in rows]


def _boot_means(correct: np.ndarray, clusters: list[str], rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates of the accuracy, resampling clusters."""
    codes, inv = np.unique(clusters, return_inverse=True)
    sums = np.bincount(inv, weights=correct, minlength=len(codes))
    counts = np.bincount(inv, minlength=len(codes)).astype(float)
    pick = rng.integers(0, len(codes), size=(N_BOOT, len(codes)))
    return sums[pick].sum(1) / counts[pick].sum(1)


def accuracy_table(model_name: str, blimp_dir: str | Path, n_per_paradigm: int | None, *, device: str = "cpu",
                   dtype: str = "float32", max_files: int | None = None, seed: int = 0) -> pd.DataFrame:
    import torch

    from eclens.evaluate import read_blimp_paradigm, sentence_logprobs
    from eclens.model import load_model

    model = load_model(model_name, device=device, dtype=dtype)
    files = sorted(Path(blimp_dir).glob("*.jsonl"))[:max_files]
    rng = np.random.default_rng(seed)
    ref_path = Path(blimp_dir).parent / "blimp-results" / "models_summary.jsonl"
    ref = pd.Series(dtype=float)
    if ref_path.exists():
        r = pd.read_json(ref_path, lines=True)
        ref = r[r["UID"] != "overall"].set_index("UID")["gpt2"]
    recs, reps = [], []
    with torch.no_grad():
        for f in files:
            rows = read_blimp_paradigm(f, n_per_paradigm)
            lp = sentence_logprobs(model, [r["good"] for r in rows] + [r["bad"] for r in rows])
            correct = (np.array(lp[: len(rows)]) > np.array(lp[len(rows):])).astype(float)
            cl = _clusters(rows)
            boot = _boot_means(correct, cl, rng)
            reps.append(boot)
            uid = rows[0]["UID"]
            recs.append({"UID": uid, "linguistics_term": rows[0]["linguistics_term"], "n": len(rows),
                         "n_clusters": len(set(cl)), "accuracy": float(correct.mean()),
                         "low": float(np.quantile(boot, 0.025)), "high": float(np.quantile(boot, 0.975)),
                         "gpt2": float(ref.get(uid, np.nan))})
    df = pd.DataFrame(recs)
    if len(df):
        overall = np.mean(np.stack(reps), axis=0)
        df = pd.concat([df, pd.DataFrame([{
            "UID": "overall", "linguistics_term": "unweighted mean over paradigms", "n": int(df["n"].sum()),
            "n_clusters": int(df["n_clusters"].sum()), "accuracy": float(df["accuracy"].mean()),
            "low": float(np.quantile(overall, 0.025)), "high": float(np.quantile(overall, 0.975)),
            "gpt2": float(df["gpt2"].mean())}])],
            ignore_index=True)
    df["model"] = Path(model_name).name
    df["bos_policy"] = "each sentence scored after the document-start token"
    return df
