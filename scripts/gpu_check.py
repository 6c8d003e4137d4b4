"""One prepared GPU check (issue 7): a Meta-Llama-3-8B-shaped model with random weights
(built from a config, no download) in bf16, measured in one run:

- plain batched forward throughput (tokens/s) and model-FLOPs utilisation against the
  GPU's bf16 peak (datasheet dense 989 TFLOP/s for H100/H200 SXM; also against the
  matmul rate measured here in the same process);
- ``ec diff`` streaming throughput and its ratio to the plain forward pass;
- exact-patching throughput (patched runs per second);
- peak GPU memory;
- if the embedded model's weights are present, ``ec diff`` on CUDA against the CPU numbers.

Writes a JSON summary (``--out``). ``--smoke`` runs a tiny config on the CPU so the
script is exercised by the test suite and cannot rot.

    python scripts/gpu_check.py --out gpu_check.json            # on a CUDA machine
    python scripts/gpu_check.py --smoke --out /tmp/smoke.json    # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

LLAMA3_8B = dict(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_mlp=14336, vocab=128256)
SMOKE = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, vocab=49152)
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, device, reps: int, warmup: int = 1) -> float:
    """Median seconds per call after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def build_bridge(shape: dict, device: str, dtype: torch.dtype, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from eclens.model import _boot, _fix_cfg

    cfg = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["d_model"], intermediate_size=shape["d_mlp"],
        num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_kv_heads"], max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    hf.eval()
    bridge = _boot("meta-llama/Meta-Llama-3-8B", hf_model=hf, tokenizer=tokenizer, device=device, dtype=dtype)
    bridge.eval()
    _fix_cfg(bridge, False)
    bridge.eclens_name = "random-llama3-8b-shape" if shape is LLAMA3_8B else "random-smoke"
    return bridge


def flops_per_token(shape: dict, seq: int) -> float:
    """Forward FLOPs per token: 2 x parameters touched per token (all matmuls incl. the LM head)
    plus attention scores and values (2 x 2 x layers x seq/2 x d_model, causal average)."""
    d, L, f, v = shape["d_model"], shape["n_layers"], shape["d_mlp"], shape["vocab"]
    d_kv = d * shape["n_kv_heads"] // shape["n_heads"]
    per_layer = d * d * 2 + d * d_kv * 2 + 3 * d * f  # q,o + k,v + gate,up,down
    params = L * per_layer + d * v
    attn = 2 * 2 * L * (seq / 2) * d
    return 2 * params + attn


def random_pairs(n: int, seq: int, vocab: int, seed: int = 0):
    """Aligned pairs of random token ids (one differing position each), lengths seq-8..seq."""
    from eclens.pairs import AlignedPair, MinimalPair

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        T = int(torch.randint(max(4, seq - 8), seq + 1, (1,), generator=g))
        clean = torch.randint(10, vocab, (T,), generator=g).tolist()
        p = int(torch.randint(1, T - 1, (1,), generator=g))
        corrupt = list(clean)
        corrupt[p] = (clean[p] + 1 + int(torch.randint(0, vocab - 20, (1,), generator=g))) % (vocab - 10) + 10
        cat = ["grammar/x", "meaning/y"][i % 2]
        out.append(AlignedPair(MinimalPair(f"r{i}", f"c{i}", f"k{i}", cat, "random"), clean, corrupt, p, "a", "b"))
    return out


def matmul_rate(device, dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timeit(lambda: a @ b, device, reps=10, warmup=3)
    return 2 * n**3 / t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batches", default="16,64,128")
    ap.add_argument("--diff-pairs", type=int, default=4096, help="pairs of the long ec diff call")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the embedded model's)")
    ap.add_argument("--profile", action="store_true", help="also profile where ec diff spends its time")
    args = ap.parse_args(argv)

    smoke = args.smoke
    device = args.device or ("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    shape = SMOKE if smoke else LLAMA3_8B
    batches = [2, 4] if smoke else [int(b) for b in args.batches.split(",")]
    seq = 16 if smoke else args.seq
    n_diff = 8 if smoke else args.diff_pairs
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": device, "dtype": str(dtype), "smoke": smoke,
        "shape": shape, "seq": seq, "host": platform.node(), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
    }
    out = Path(args.out)

    def save():
        out.write_text(json.dumps(res, indent=2, default=str) + "\n")

    def section(name, fn):
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others
            res[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        res.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 2)
        print(f"[{name}] {json.dumps(res[name], default=str)[:600]}", flush=True)
        save()

    from transformers import AutoTokenizer

    tok_dir = args.tokenizer
    if tok_dir is None:
        from eclens.model import _embedded_hf_dir

        tok_dir = str(_embedded_hf_dir())
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    torch.set_grad_enabled(False)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        section("matmul", lambda: {"bf16_tflops_8192": round(matmul_rate(device, dtype, 8192) / 1e12, 1)})

    t0 = time.perf_counter()
    model = build_bridge(shape, device, dtype, tokenizer)
    res["build_seconds"] = round(time.perf_counter() - t0, 1)
    res["n_params"] = sum(p.numel() for p in model.parameters())
    peak = next((v for k, v in BF16_PEAK.items() if res["gpu"] and k in res["gpu"]), None)
    measured = (res.get("matmul") or {}).get("bf16_tflops_8192")
    fpt = flops_per_token(shape, seq)

    def forward():
        rows = {}
        for b in batches:
            toks = torch.randint(10, shape["vocab"], (b, seq), device=device)
            t = timeit(lambda toks=toks: model(toks), device, reps=3 if smoke else 5)
            tps = b * seq / t
            rows[b] = {"seconds": round(t, 4), "tokens_per_s": round(tps), "tflops": round(tps * fpt / 1e12, 1),
                       "mfu_vs_datasheet": round(tps * fpt / peak, 3) if peak else None,
                       "mfu_vs_measured_matmul": round(tps * fpt / (measured * 1e12), 3) if measured else None}
        return rows

    section("forward", forward)
    res["flops_per_token"] = fpt

    def diff_vs_forward():
        """Whole ``run_diff`` calls against plain batched forwards of the same pairs, at two sizes: a short call
        (512 pairs, where fixed per-call costs show) and a long one (``--diff-pairs``), and the short call with
        the pair sample kept on the device (the layout before the host sample) for comparison."""
        from eclens.diff import run_diff
        from eclens.hooks import iter_batches, pad_id

        bs = 4 if smoke else 64
        pid = pad_id(model)
        out = {"batch_pairs": bs}
        sizes = [("short", 8 if smoke else 512), ("long", 16 if smoke else n_diff)]
        for label, n in sizes:
            pairs = random_pairs(n, seq, shape["vocab"])

            def plain(pairs=pairs):
                for batch in iter_batches(pairs, bs, pid, device):
                    model(batch.tokens)

            def streaming(pairs=pairs, **kw):
                return run_diff(model, pairs, batch_size=bs, categories=False, **kw)

            reps, warm = (1, 1) if smoke else ((3, 1) if label == "short" else (2, 0))
            t_plain = timeit(plain, device, reps=reps, warmup=warm)
            t_diff = timeit(streaming, device, reps=reps, warmup=warm)
            row = {"pairs": n, "plain_s": round(t_plain, 3), "diff_s": round(t_diff, 3),
                   "plain_pairs_per_s": round(n / t_plain, 1), "diff_pairs_per_s": round(n / t_diff, 1),
                   "diff_throughput_ratio": round(t_plain / t_diff, 3)}
            if label == "short":
                t_dev = timeit(lambda: streaming(host_sample=False), device, reps=1 if smoke else 2, warmup=0)
                row["device_sample_diff_s"] = round(t_dev, 3)
                row["device_sample_ratio"] = round(t_plain / t_dev, 3)
            out[label] = row
        # The figure the target is about: streaming throughput on a run long enough to be a run.
        out["diff_throughput_ratio"] = out["long"]["diff_throughput_ratio"]
        return out

    section("diff", diff_vs_forward)

    def diff_profile():
        """Where the streaming overhead goes: one profiled run_diff of two batches, and variants."""
        from torch.profiler import ProfilerActivity, profile

        from eclens.diff import run_diff

        pairs = random_pairs(16 if smoke else 128, seq, shape["vocab"], seed=3)
        bs = 4 if smoke else 64
        variants = {}
        for name, kw in (("default", {}), ("sample_64", {"sample_size": 64}), ("max_offset_0", {"max_offset": 0})):
            variants[name] = round(timeit(lambda kw=kw: run_diff(model, pairs, batch_size=bs, categories=False, **kw),
                                          device, reps=1 if smoke else 2), 3)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with profile(activities=acts) as prof:
            run_diff(model, pairs, batch_size=bs, categories=False)
            sync(device)
        key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        rows = []
        for ev in sorted(prof.key_averages(), key=lambda e: -getattr(e, key.replace("_total", "_total"), 0))[:15]:
            rows.append({"name": ev.key, "calls": ev.count, "self_cpu_ms": round(ev.self_cpu_time_total / 1e3, 1),
                         "self_device_ms": round(getattr(ev, "self_device_time_total", 0) / 1e3, 1)})
        return {"pairs": len(pairs), "seconds": variants, "top_ops": rows}

    if args.profile:
        section("diff_profile", diff_profile)

    def patching():
        from eclens.patch import exact_patch

        pairs = random_pairs(2, 24 if not smoke else 10, shape["vocab"], seed=1)
        t0 = time.perf_counter()
        df = exact_patch(model, pairs, hooks=["hook_resid_pre"], direction="denoise")
        sync(device)
        t = time.perf_counter() - t0
        return {"pairs": len(pairs), "patched_runs": len(df), "seconds": round(t, 3),
                "patched_runs_per_s": round(len(df) / t, 1)}

    section("patch", patching)

    if device.startswith("cuda"):
        res["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        del model
        torch.cuda.empty_cache()
        section("embedded_cuda_vs_cpu", lambda: embedded_check(device, tokenizer))
    save()
    print(json.dumps({k: res.get(k) for k in ("gpu", "forward", "diff", "patch", "peak_gpu_memory_gib")},
                     default=str))
    return 0


def embedded_check(device: str, tokenizer) -> dict:
    """``ec diff`` on CUDA against the CPU, same weights, float32: the embedded model where its
    weights are present, else a random-weight model of the embedded model's exact shape
    (built from one seed on the CPU and copied, so both devices hold identical weights)."""
    import numpy as np

    from eclens import load_model, tiny_model
    from eclens.diff import run_diff
    from eclens.model import _embedded_hf_dir

    have = (_embedded_hf_dir() / "model.safetensors").exists()
    pairs = random_pairs(16, 12, 49152, seed=2)
    outs = {}
    for dev in ("cpu", device):
        if have:
            m = load_model("smollm2-135m", device=dev)
        else:
            m = tiny_model(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_mlp=1536, vocab_from=tokenizer,
                           seed=0, device=dev)
        outs[dev] = run_diff(m, pairs, batch_size=8, categories=False).layers
        del m
    a, b = outs["cpu"], outs[device]
    rel = {}
    for col in ("rel_l2_mean", "cos_mean", "l2_mean", "mean_abs_z", "dir_consistency"):
        if col in a:
            x, y = np.asarray(a[col], float), np.asarray(b[col], float)
            ok = np.isfinite(x) & np.isfinite(y)
            rel[col] = float(np.max(np.abs(x[ok] - y[ok]) / np.maximum(np.abs(x[ok]), 1e-6))) if ok.any() else None
    vals = [v for v in rel.values() if v is not None]
    return {"weights": "embedded" if have else "random, embedded shape (weights too large to carry)",
            "max_rel_err": rel, "ok": bool(vals) and all(v <= 1e-3 for v in vals)}


if __name__ == "__main__":
    sys.exit(main())
