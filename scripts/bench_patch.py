"""Benchmark `ec patch` in one process.

A. The full resid_pre (layer x position) sweep of the same pairs by TransformerLens's
   ``patching.get_act_patch_resid_pre`` (one forward pass per patch) and by
   ``eclens.patch.exact_patch`` (batched patched copies; also with the no-op positions
   before ``p`` run, to separate the batching speed-up from that shortcut): seconds,
   speed-up, and the largest difference of every metric.
B. Attribution patching against exact patching over (hook in resid_pre/attn_out/mlp_out/
   resid_post, layer, position >= p), denoising, logit difference: cost ratio, Spearman
   correlation (pooled and median per pair) and top-K overlap per pair.

    python scripts/bench_patch.py --threads 1 --out bench_patch.json          # embedded model, CPU
    python scripts/bench_patch.py --model random --device cuda --tokenizer DIR  # SmolLM2-shaped random weights

``--model random`` builds a random-weight Llama with the embedded model's shape (30
layers, d_model 576, 9 heads / 3 KV heads, d_mlp 1536) and its tokenizer (``--tokenizer``:
a folder with tokenizer.json; default the embedded model's), for machines without the
embedded weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's per-patch progress bar
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# Short natural sentences (6-9 tokens under SmolLM2's tokenizer), several categories.
PAIRS = [
    ("agr", "The keys to the cabinet are here.", "The keys to the cabinet is here.", "grammar/agreement"),
    ("tense", "They went to the market yesterday.", "They go to the market yesterday.", "grammar/tense"),
    ("article", "He ate an apple after lunch.", "He ate a apple after lunch.", "grammar/article"),
    ("subject", "The doctor said that she was tired.", "The teacher said that she was tired.", "meaning/subject"),
    ("location", "We stayed in Paris for a week.", "We stayed in London for a week.", "meaning/location"),
    ("prep", "She put the book on the table.", "She put the book in the table.", "grammar/preposition"),
]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load(args, device: str | None = None):
    import eclens

    if args.model == "tiny":  # 2-layer random weights: a smoke run for the test suite
        return eclens.tiny_model(device=device or args.device)
    if args.model != "random":
        return eclens.load_model(args.model, device=args.device, dtype=args.dtype)
    from transformers import AutoTokenizer

    tok_dir = args.tokenizer
    if tok_dir is None:
        from eclens.model import _embedded_hf_dir

        tok_dir = _embedded_hf_dir()
    from eclens.model import DTYPES

    tok = AutoTokenizer.from_pretrained(tok_dir)
    return eclens.tiny_model(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_mlp=1536, vocab_from=tok,
                             seed=0, device=device or args.device, dtype=DTYPES[args.dtype])


def bench_tl_vs_ec(model, pairs, device: str, batch_size: int) -> dict:
    from transformer_lens import patching as tlp

    from eclens import patch as P
    from eclens.metrics import METRICS

    # TransformerLens: one forward pass per (layer, position); all three metrics on each.
    sync(device)
    t0 = time.perf_counter()
    ref = {}
    for a in pairs:
        ctx = next(P.prepare(model, [a])).metrics
        clean = torch.tensor([a.clean_ids], device=device)
        corrupt = torch.tensor([a.corrupt_ids], device=device)
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
        fns = {m: (lambda logits, m=m, ctx=ctx: ctx.evaluate(logits)[m][0]) for m in METRICS}
        res = tlp.get_act_patch_resid_pre(model, corrupt, cache, fns)
        ref[a.id] = res.values.float().cpu().numpy()  # [metric, layer, pos]
    sync(device)
    t_tl = time.perf_counter() - t0

    out = {"pairs": [a.id for a in pairs], "lengths": [a.length for a in pairs],
           "patched_runs": int(sum(model.cfg.n_layers * a.length for a in pairs)), "tl_seconds": round(t_tl, 3)}
    for label, skip in (("ec", True), ("ec_no_shortcut", False)):
        sync(device)
        t0 = time.perf_counter()
        df = P.exact_patch(model, pairs, hooks="resid_pre", direction="denoise", batch_size=batch_size,
                           skip_noops=skip)
        sync(device)
        t = time.perf_counter() - t0
        worst = {}
        for m_i, m in enumerate(METRICS):
            diffs = []
            for a in pairs:
                g = df[df.pair_id == a.id]
                ours = np.full((model.cfg.n_layers, a.length), np.nan)
                ours[g["layer"].to_numpy(), g["position"].to_numpy()] = g[m].to_numpy()
                diffs.append(np.nanmax(np.abs(ours - ref[a.id][m_i])))
            worst[m] = float(max(diffs))
        out[f"{label}_seconds"] = round(t, 3)
        out[f"{label}_speedup"] = round(t_tl / t, 1)
        out[f"{label}_max_abs_diff"] = worst
    return out


def bench_attribution(model, pairs, device: str, batch_size: int, k: int) -> dict:
    from scipy.stats import spearmanr

    from eclens import patch as P

    sync(device)
    t0 = time.perf_counter()
    att = P.attribution_patch(model, pairs, hooks=P.EXACT_HOOKS, direction="denoise", metric="logit_diff",
                              batch_size=len(pairs))
    sync(device)
    t_attr = time.perf_counter() - t0
    t0 = time.perf_counter()
    ex = P.exact_patch(model, pairs, hooks=P.EXACT_HOOKS, direction="denoise", batch_size=batch_size)
    sync(device)
    t_exact = time.perf_counter() - t0
    ex = ex.assign(exact=ex["logit_diff"] - ex["logit_diff_corrupt"])
    key = ["pair_id", "hook", "layer", "position"]
    m = att.drop(columns=["exact"]).merge(ex[key + ["exact"]], on=key)
    m = m[m["position_kind"] != "before"]  # both are exactly 0 there (no-op patches)
    per_rho, per_overlap = [], []
    for _, g in m.groupby("pair_id"):
        per_rho.append(float(spearmanr(g["attribution"], g["exact"]).statistic))
        per_overlap.append(P.topk_overlap(g["attribution"].to_numpy(), g["exact"].to_numpy(), k))
    by_hook = {h: round(float(spearmanr(g["attribution"], g["exact"]).statistic), 3)
               for h, g in m.groupby("hook")}
    # Residual-stream patches at p carry the whole difference (exact effects tie across early
    # layers) and are where the linear estimate is worst; component outputs are the usual use.
    overlap_by_hook = {h: round(float(np.mean([P.topk_overlap(g["attribution"].to_numpy(), g["exact"].to_numpy(), k)
                                               for _, g in gh.groupby("pair_id")])), 3)
                       for h, gh in m.groupby("hook")}
    comp = m[m["hook"].isin(["hook_attn_out", "hook_mlp_out"])]
    comp_overlap = [P.topk_overlap(g["attribution"].to_numpy(), g["exact"].to_numpy(), k)
                    for _, g in comp.groupby("pair_id")]
    return {
        "pairs": len(pairs), "components": int(len(m)), "attribution_seconds": round(t_attr, 3),
        "exact_seconds": round(t_exact, 3), "cost_ratio_exact_over_attribution": round(t_exact / t_attr, 1),
        "spearman_pooled": round(float(spearmanr(m["attribution"], m["exact"]).statistic), 3),
        "spearman_median_pair": round(float(np.median(per_rho)), 3),
        "spearman_by_hook": by_hook,
        f"top{k}_overlap_mean": round(float(np.mean(per_overlap)), 3),
        f"top{k}_overlap_per_pair": [round(x, 2) for x in per_overlap],
        f"top{k}_overlap_by_hook": overlap_by_hook,
        "components_attn_mlp": {
            "spearman_pooled": round(float(spearmanr(comp["attribution"], comp["exact"]).statistic), 3),
            f"top{k}_overlap_mean": round(float(np.mean(comp_overlap)), 3),
        },
    }


def compare_devices(args, model, pairs) -> dict:
    """The same random weights on the CPU: exact patching (with heads), a dims set and attribution agree."""
    from eclens import patch as P
    from eclens.metrics import METRICS

    cpu = load(args, "cpu")
    out = {}
    sub = pairs[:2]
    a = P.exact_patch(model, sub, hooks=P.EXACT_HOOKS, heads=True, direction="both")
    b = P.exact_patch(cpu, sub, hooks=P.EXACT_HOOKS, heads=True, direction="both")
    out["exact_rows"] = len(a)
    out["exact_max_abs_diff"] = {m: float(np.nanmax(np.abs(a[m].to_numpy() - b[m].to_numpy()))) for m in METRICS}
    d, layer = model.cfg.d_model, min(10, model.cfg.n_layers - 1)
    dims = list(range(0, d, d // 12))
    da = P.dims_intervention(model, sub, "resid_pre", layer, dims, method="patch", n_controls=20, direction="both")
    db = P.dims_intervention(cpu, sub, "resid_pre", layer, dims, method="patch", n_controls=20, direction="both")
    out["dims_effect_max_abs_diff"] = float(np.nanmax(np.abs(da.table["kl_effect"].to_numpy()
                                                             - db.table["kl_effect"].to_numpy())))
    out["dims_p_equal"] = bool((da.table["kl_p"].to_numpy() == db.table["kl_p"].to_numpy()).all())
    ta = P.attribution_patch(model, sub, hooks=P.EXACT_HOOKS, heads=True, direction="both", metric="kl")
    tb = P.attribution_patch(cpu, sub, hooks=P.EXACT_HOOKS, heads=True, direction="both", metric="kl")
    scale = float(np.nanmax(np.abs(tb["attribution"].to_numpy())))
    out["attribution_max_abs_diff_rel"] = float(np.nanmax(np.abs(ta["attribution"].to_numpy()
                                                                 - tb["attribution"].to_numpy()))) / scale
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), any eclens model, 'random' or 'tiny'")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for --model random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--tl-pairs", type=int, default=3, help="pairs in the TransformerLens comparison")
    ap.add_argument("--attr-pairs", type=int, default=6, help="pairs in the attribution comparison")
    ap.add_argument("--batch-size", type=int, default=128, help="patched copies per forward pass")
    ap.add_argument("--k", type=int, default=10, help="K of the top-K overlap")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--compare-cpu", action="store_true",
                    help="with --model random/tiny on CUDA: check exact, dims and attribution against the CPU")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    from eclens.pairs import MinimalPair, check_with_model

    t0 = time.perf_counter()
    model = load(args)
    load_s = time.perf_counter() - t0
    res = check_with_model([MinimalPair(i, c, k, cat) for i, c, k, cat in PAIRS], model)
    if res.rejected:
        print("rejected:", [(r.pair.id, r.label) for r in res.rejected], file=sys.stderr)
    pairs = res.valid
    env = {
        "model": args.model, "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "platform": platform.platform(),
        "load_avg_start": os.getloadavg(), "load_seconds": round(load_s, 1),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }
    print(json.dumps({"env": env}), flush=True)
    a = bench_tl_vs_ec(model, pairs[: args.tl_pairs], args.device, args.batch_size)
    print(json.dumps({"tl_vs_ec": a}), flush=True)
    b = bench_attribution(model, pairs[: args.attr_pairs], args.device, args.batch_size, args.k)
    print(json.dumps({"attribution_vs_exact": b}), flush=True)
    env["load_avg_end"] = os.getloadavg()
    result = {"env": env, "tl_vs_ec": a, "attribution_vs_exact": b}
    if args.compare_cpu:
        result["cuda_vs_cpu"] = compare_devices(args, model, pairs)
        print(json.dumps({"cuda_vs_cpu": result["cuda_vs_cpu"]}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresid_pre sweep of {len(a['pairs'])} pairs ({a['patched_runs']} patched runs): "
          f"TransformerLens {a['tl_seconds']} s, ec {a['ec_seconds']} s ({a['ec_speedup']}x; "
          f"{a['ec_no_shortcut_speedup']}x without the no-op shortcut); max |diff| {a['ec_max_abs_diff']}")
    print(f"attribution vs exact on {b['pairs']} pairs, {b['components']} components: exact/attribution cost "
          f"{b['cost_ratio_exact_over_attribution']}x, Spearman {b['spearman_pooled']} pooled / "
          f"{b['spearman_median_pair']} median per pair, top-{args.k} overlap {b[f'top{args.k}_overlap_mean']}; "
          f"attn_out+mlp_out only: Spearman {b['components_attn_mlp']['spearman_pooled']}, top-{args.k} overlap "
          f"{b['components_attn_mlp'][f'top{args.k}_overlap_mean']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
