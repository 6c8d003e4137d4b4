"""The reference model's view of template pairs: how likely each clean sentence is, and
how large each change is at layer 0.

One reference model (default: the embedded SmolLM2) judges every frame, whatever model
the pairs are later used with, so every model sees the same pairs. Scores are kept in
a JSON cache (``<eclens cache>/reference/<model>.json``) keyed by sentence, so a second
generation with the same frames runs no model at all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ...model import cache_root
from ...pairs import AlignedPair, MinimalPair, align
from ...runs import atomic_path

HOOK = "blocks.0.hook_resid_post"


class Reference:
    """Lazily loaded reference model with a score cache."""

    def __init__(self, name: str = "smollm2-135m", batch_size: int = 64):
        self.name = name
        self.batch_size = batch_size
        self._model = None
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        self.path = Path(cache_root()) / "reference" / f"{safe}.json"
        try:
            self.cache: dict[str, float] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.cache = {}
        self._dirty = False

    @property
    def model(self):
        if self._model is None:
            from ...model import load_model

            torch.set_grad_enabled(False)
            self._model = load_model(self.name)
        return self._model

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            Path(tmp).write_text(json.dumps(self.cache, sort_keys=True))
        self._dirty = False

    def _tokens(self, text: str) -> list[int]:
        m = self.model
        ids = list(m.tokenizer(text, add_special_tokens=False)["input_ids"])
        if m.cfg.default_prepend_bos and m.tokenizer.bos_token_id is not None:
            ids = [m.tokenizer.bos_token_id, *ids]
        return ids

    def _batch(self, seqs: Sequence[list[int]]) -> torch.Tensor:
        m = self.model
        pad = m.tokenizer.pad_token_id if m.tokenizer.pad_token_id is not None else 0
        n = max(len(s) for s in seqs)
        # Right padding: with causal attention the real tokens never see the pads.
        return torch.tensor([s + [pad] * (n - len(s)) for s in seqs])

    def logprobs(self, sentences: Sequence[str]) -> dict[str, float]:
        """Mean log-probability per predicted token of each sentence (its first token is not predicted)."""
        todo = sorted({s for s in sentences if f"lp\x1f{s}" not in self.cache})
        todo.sort(key=len)
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            seqs = [self._tokens(s) for s in chunk]
            with torch.no_grad():
                logits = self.model(self._batch(seqs))
            lp = torch.log_softmax(logits.float(), -1)
            for j, (s, ids) in enumerate(zip(chunk, seqs)):
                t = torch.tensor(ids[1:])
                got = lp[j, :len(ids) - 1].gather(-1, t[:, None]).squeeze(-1)
                self.cache[f"lp\x1f{s}"] = round(float(got.mean()), 5)
                self._dirty = True
        return {s: self.cache[f"lp\x1f{s}"] for s in sentences}

    def layer0_change(self, pairs: Sequence[MinimalPair]) -> dict[str, float | None]:
        """Relative L2 change of the residual stream after block 0 at each pair's ``detect`` token (else its
        changed token), under the reference tokenizer; ``None`` for a pair that does not align there."""
        out: dict[str, float | None] = {}
        todo: list[tuple[str, AlignedPair]] = []
        for p in pairs:
            key = f"l0\x1f{p.clean}\x1f{p.corrupt}\x1f{p.detect}"
            if key in self.cache:
                out[p.id] = self.cache[key]
                continue
            a = align(p, self.model.tokenizer, prepend_bos=bool(self.model.cfg.default_prepend_bos), mode="span")
            if not isinstance(a, AlignedPair):
                out[p.id] = None
                continue
            todo.append((key, a))
            out[p.id] = None
        # Each distinct sequence runs once (error and twin share their clean sentence), and only through block 0.
        seqs = list(dict.fromkeys(tuple(x) for _, a in todo for x in (a.clean_ids, a.corrupt_ids)))
        rows: dict[tuple[int, ...], torch.Tensor] = {}
        seqs.sort(key=len)
        for i in range(0, len(seqs), self.batch_size):
            chunk = seqs[i:i + self.batch_size]
            with torch.no_grad():
                _, cache = self.model.run_with_cache(self._batch([list(x) for x in chunk]),
                                                     names_filter=lambda name: name == HOOK, stop_at_layer=1)
            for j, x in enumerate(chunk):
                rows[x] = cache[HOOK][j, :len(x)].float()
        for key, a in todo:
            t_cor = a.detect_position if a.detect_position is not None else a.corrupt_end - 1
            off = t_cor - (a.corrupt_end - 1)
            t_clean = a.position_at(off, "clean") if off >= 0 else a.clean_end - 1
            h0, h1 = rows[tuple(a.clean_ids)][t_clean], rows[tuple(a.corrupt_ids)][t_cor]
            self.cache[key] = round(float((h1 - h0).norm() / h0.norm().clamp_min(1e-12)), 5)
            self._dirty = True
        for key, a in todo:
            out[a.id] = self.cache[key]
        return out

