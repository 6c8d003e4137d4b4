"""Benchmark ``ec diff`` streaming against the floor and the naive way, in one process.

On the same pairs and model:

1. the plain batched forward pass with no hooks (the floor);
2. ``eclens.run_diff`` streaming with the default hooks (5 per layer), offsets
   ``0..3`` and the last token, per-category statistics, pair sample, per-pair
   log-probs and KL;
3. the naive way: one sentence at a time, ``run_with_cache`` of every hook, the
   differences at the aligned positions computed afterwards (the same default hooks
   and positions, kept per pair, statistics at the end).

Targets: (2) within 1.2x of (1) (issue 20); (3) at least 10x slower than (2) per pair; peak
memory of (2) for 4,000 pairs within 10 % of that for 500 (each in its own process, the 500 pairs
repeated under new ids so that both runs have the same batch shapes). Timings interleave
(1) and (2) ``--repeats`` times and report the median ratio of wall times, and of
this process's CPU time (``time.process_time``: on a CPU shared with other jobs the
wall time measures them too; run with ``--threads 1`` there). Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the
process's peak resident set size (``VmHWM``, reset before each run through
``/proc/self/clear_refs``), which includes the model and everything else resident.

    python scripts/bench_diff.py                       # embedded model, CPU
    python scripts/bench_diff.py --model random --device cuda --batch-size 128
    python scripts/bench_diff.py --n-speed 64 --n-naive 8 --mem 100 800   # a quick run
    python scripts/bench_diff.py --e2e 225 --repeats 3             # ec diff end to end (below)
    python scripts/bench_diff.py --e2e 2000 --model random --repeats 3

``--e2e N [N ...]``: ``ec diff`` end to end instead — everything after the model is loaded (the
streaming pass, then the finishing work: every table built from the accumulated statistics and
every file written, :func:`eclens.steps.diff_step` at the default settings into a fresh folder) —
against the plain forward pass over the same ``N`` pairs, interleaved ``--repeats`` times. Reports
the median ratio of wall times (and of this process's CPU times, less sensitive to other jobs on a shared
CPU) and the finishing work's share of the total. Targets: <= 1.6x at 225 pairs,
<= 1.25x at 2,000 pairs with the finishing work <= 10 % of the total.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from eclens.hooks import DEFAULT_HOOKS, iter_batches, pad_id, select_hooks  # noqa: E402
from eclens.pairs import AlignedPair, MinimalPair, align  # noqa: E402

BLIMP = Path(__file__).resolve().parents[2] / "shared" / "data" / "blimp"


# ----------------------------------------------------------------------------- pairs


def inline_pairs(tokenizer, n: int) -> list[AlignedPair]:
    """Agreement pairs from a few inline frames (fallback when no generator or BLiMP is here)."""
    subjects = ["dog", "cat", "girl", "boy", "teacher", "doctor", "farmer", "singer", "pilot", "child", "horse",
                "writer", "baker", "nurse", "driver", "student", "painter", "player", "king", "queen"]
    verbs = [("runs", "run"), ("sleeps", "sleep"), ("sings", "sing"), ("walks", "walk"), ("reads", "read"),
             ("smiles", "smile"), ("waits", "wait"), ("works", "work")]
    tails = ["", " every day", " in the garden", " after dinner", " near the old bridge", " with great care",
             " before the long winter", " when the sun goes down"]
    adjs = ["", "old ", "young ", "tall ", "quiet ", "happy "]
    out = []
    for adj in adjs:
        for s in subjects:
            for v, w in verbs:
                for t in tails:
                    p = MinimalPair(f"i{len(out)}", f"The {adj}{s} {v}{t}.", f"The {adj}{s} {w}{t}.",
                                    "grammar/agreement" if len(out) % 2 else "meaning/inline")
                    a = align(p, tokenizer)
                    if isinstance(a, AlignedPair):
                        out.append(a)
                    if len(out) >= n:
                        return out
    return out


def make_pairs(tokenizer, n: int) -> tuple[list[AlignedPair], str]:
    """``n`` aligned pairs, shuffled (seeded) so that every prefix mixes categories and lengths alike."""
    pairs, source = _make_pairs(tokenizer, n)
    random.Random(0).shuffle(pairs)
    return pairs, source


def _make_pairs(tokenizer, n: int) -> tuple[list[AlignedPair], str]:
    try:
        from eclens.sources.templates import generate_templates

        per = -(-n // 8)
        raw = generate_templates(tokenizer, n_per_category=per, seed=0)
        al = [a for a in (align(p, tokenizer) for p in raw) if isinstance(a, AlignedPair)]
        if len(al) >= n:
            return al, "eclens.sources.templates"
    except Exception as e:  # noqa: BLE001 - fall back to other sources
        print(f"[templates unavailable: {type(e).__name__}: {e}]", file=sys.stderr)
    if BLIMP.is_dir():
        out: list[AlignedPair] = []
        for f in sorted(BLIMP.glob("*.jsonl")):
            for i, line in enumerate(f.read_text().splitlines()):
                r = json.loads(line)
                a = align(MinimalPair(f"{f.stem}-{i}", r["sentence_good"], r["sentence_bad"],
                                      f"blimp/{r.get('field', 'x')}"), tokenizer)
                if isinstance(a, AlignedPair) and a.position > 0:
                    out.append(a)
        if len(out) >= n:
            return out[:n], "BLiMP"
    return inline_pairs(tokenizer, n), "inline templates"


# ----------------------------------------------------------------------------- the three ways


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall time, and this process's CPU time (robust to other processes on a shared CPU)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *a):
        sync(self.device)
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def floor_pass(model, pairs, batch_size, device) -> Clock:
    with Clock(device) as c, torch.inference_mode():
        for b in iter_batches(pairs, batch_size, pad_id(model), device):
            model(b.tokens)
    return c


def streaming(model, pairs, batch_size, device, **kw):
    from eclens.diff import run_diff

    with Clock(device) as c:
        res = run_diff(model, pairs, hooks=None, max_offset=3, batch_size=batch_size, **kw)
    return c, res


def naive(model, pairs, device, max_offset=3):
    """One sentence at a time, the whole cache, differences afterwards (what a first script does)."""
    names = select_hooks(model)
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for a in pairs:
            _, cc = model.run_with_cache(torch.tensor([a.clean_ids], device=device))
            _, cx = model.run_with_cache(torch.tensor([a.corrupt_ids], device=device))
            pos = [a.position + k for k in range(max_offset + 1) if a.position + k < a.length] + [a.length - 1]
            for n in names:
                kept[n].append((cx[n][0, pos] - cc[n][0, pos]).cpu())
            del cc, cx
        stats = {n: (torch.cat(v).mean(0), torch.cat(v).std(0)) for n, v in kept.items()}
    sync(device)
    return time.perf_counter() - t0, stats


# ----------------------------------------------------------------------------- memory


def renamed(a: AlignedPair, new_id: str) -> AlignedPair:
    """The same aligned pair under another id (another place in the pair sample)."""
    from dataclasses import replace

    return replace(a, pair=replace(a.pair, id=new_id))


def _vm_hwm() -> int:
    """Peak resident set size of this process (bytes), from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


def _reset_hwm() -> bool:
    """Reset the peak-RSS mark (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn, device) -> tuple[int, float]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base, time.perf_counter() - t0
    if not _reset_hwm():
        print("[cannot reset the peak-RSS mark; the second run's peak includes the first's]", file=sys.stderr)
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return _vm_hwm(), dt


# ----------------------------------------------------------------------------- main


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo) and core count: a ratio to the forward pass depends on the CPU (the
    finishing work does not shrink with a faster forward pass), so a figure says which it was measured on."""
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def load(args):
    import eclens

    if args.model == "tiny":  # a small random model: the finishing work at large sizes where a real one is too slow
        return eclens.tiny_model(n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, d_mlp=256, device=args.device,
                                 dtype=getattr(torch, args.dtype))
    if args.model == "random":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
        # SmolLM2-135M's shape with random weights: the embedded checkpoint cannot travel everywhere.
        return eclens.tiny_model(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_mlp=1536, vocab_from=tok,
                                 device=args.device, dtype=getattr(torch, args.dtype))
    return eclens.load_model(args.model, device=args.device, dtype=args.dtype)


def end_to_end(model, pairs, batch_size, device) -> tuple[Clock, float]:
    """``diff_step`` (stream, tables, files) into a fresh folder; returns its clock and the streaming seconds."""
    import shutil
    import tempfile

    from eclens.diff import DiffConfig
    from eclens.steps import diff_step

    run = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        with Clock(device) as c:
            # as `ec run` and `ec diff` run it by default (no --keep-state: the complete state is not written)
            done = diff_step(run, model, pairs, DiffConfig(), batch_size=batch_size, progress=False,
                             write_state=False)
        return c, float(done.value.timing["seconds"])
    finally:
        shutil.rmtree(run, ignore_errors=True)


def e2e_main(args, model, device, pairs, source) -> int:
    cpu = cpu_name()
    out: dict = {"model": args.model, "device": str(device), "cpu": cpu, "batch_size": args.batch_size,
                 "pairs_source": source, "load_average": os.getloadavg(), "sizes": {}}
    print(f"ec diff end to end on {device} ({cpu}), {torch.get_num_threads()} torch threads", flush=True)
    for n in args.e2e:
        sub = pairs[:n]
        floor_pass(model, sub[: args.batch_size], args.batch_size, device)  # warm-up
        rows = []
        for r in range(args.repeats):
            f = floor_pass(model, sub, args.batch_size, device)
            e, stream = end_to_end(model, sub, args.batch_size, device)
            finish = e.wall - stream
            rows.append({"floor_s": f.wall, "e2e_s": e.wall, "stream_s": stream, "finish_s": finish,
                         "ratio": e.wall / f.wall, "stream_ratio": stream / f.wall, "finish_share": finish / e.wall,
                         "cpu_ratio": e.cpu / f.cpu})
            print(f"  {len(sub)} pairs, repeat {r + 1}: forward {f.wall:.1f}s, ec diff {e.wall:.1f}s (stream "
                  f"{stream:.1f}s, finishing {finish:.1f}s): {e.wall / f.wall:.2f}x the forward, finishing "
                  f"{100 * finish / e.wall:.0f} % of the total", flush=True)
        med = {k: statistics.median(x[k] for x in rows) for k in rows[0]}
        out["sizes"][str(len(sub))] = {"repeats": rows, "median": med}
        print(f"{len(sub)} pairs: ec diff / plain forward {med['ratio']:.2f}x median (streaming "
              f"{med['stream_ratio']:.2f}x), finishing {100 * med['finish_share']:.0f} % of the total "
              f"({med['finish_s']:.1f}s); this process's CPU time {med['cpu_ratio']:.2f}x the forward's; load "
              f"average {os.getloadavg()[0]:.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def check_cuda(args) -> None:
    """The same pairs and weights on the CPU and on CUDA: the statistics must agree to float32 noise."""
    import eclens
    from eclens.diff import run_diff

    tok = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    shape = dict(n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, d_mlp=256, vocab_from=tok, seed=0)
    mc = eclens.tiny_model(**shape, device="cpu")
    mg = eclens.tiny_model(**shape, device="cuda")
    pairs, _ = make_pairs(mc.tokenizer, 96)
    hooks = "default,mlp.hook_post,attn.hook_z,attn.hook_pattern"
    rc = run_diff(mc, pairs, hooks=hooks, batch_size=16, sample_size=128)
    rg = run_diff(mg, pairs, hooks=hooks, batch_size=16, sample_size=128)
    worst: dict[str, float] = {}
    for h in rc.hooks:
        for cat in rc.categories:
            a, b = rc.cell_stats(h, cat), rg.cell_stats(h, cat)
            for k in ("mean_delta", "std_delta", "mean_abs_delta", "sigma_clean", "rel_l2_mean", "cos_mean",
                      "absz_median", "loo_cos_mean", "dir_consistency"):
                x, y = a[k].double(), b[k].double()
                ok = torch.isfinite(x) & torch.isfinite(y)
                e = float((x[ok] - y[ok]).norm() / x[ok].norm().clamp_min(1e-30)) if ok.any() else 0.0
                worst[k] = max(worst.get(k, 0.0), e)
    same_sample = sorted(rc.meta["sample_ids"], key=str) == sorted(rg.meta["sample_ids"], key=str)
    kl = float((rc.pairs["kl_mean"] - rg.pairs["kl_mean"]).abs().max())
    print(f"CUDA vs CPU on {len(pairs)} pairs, {sum(len(g.names) for g in rc.groups)} hook points: "
          f"same sample {same_sample}; max |kl_mean| diff {kl:.2e}; worst relative differences: "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()), flush=True)


def memory_child(n: int) -> tuple[int, float, int]:
    """Peak memory of one streaming run of ``n`` pairs, measured in a child process with this one's options."""
    import subprocess

    argv = list(sys.argv[1:])
    if "--json" in argv:  # the child reports on stdout only
        i = argv.index("--json")
        del argv[i:i + 2]
    r = subprocess.run([sys.executable, __file__, *argv, "--mem-one", str(n)], capture_output=True, text=True)
    line = next((x for x in r.stdout.splitlines() if x.startswith("MEMORY ")), None)
    if r.returncode != 0 or line is None:
        raise SystemExit(f"memory run of {n} pairs failed: {r.stderr[-2000:]}")
    d = json.loads(line[len("MEMORY "):])
    return d["peak"], d["seconds"], d["pairs"]


def mem_one(args, model, device, pairs) -> int:
    """The child of :func:`memory_child`: the first ``min(--mem)`` pairs repeated under new ids up to ``n``
    (the same batch shapes at every size; a larger draw of pairs also holds longer sentences, whose bigger
    logits raise the peak by themselves), after a warm-up run, with the sample size of the timing runs."""
    n = args.mem_one
    small = pairs[: min(args.mem)]
    sub = [renamed(small[i % len(small)], f"{small[i % len(small)].id}#{i // len(small)}") for i in range(n)]
    streaming(model, sub[: args.batch_size], args.batch_size, device, sample_size=512)
    peak, dt = peak_memory(lambda: streaming(model, sub, args.batch_size, device, sample_size=512), device)
    print("MEMORY " + json.dumps({"peak": peak, "seconds": dt, "pairs": len(sub)}), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a model name/path, 'random' (SmolLM2-135M's shape) or 'tiny'")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for --model random (default: embedded)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-speed", type=int, default=256, help="pairs for the (1) vs (2) timing")
    ap.add_argument("--n-naive", type=int, default=32, help="pairs for (3) (compared per pair)")
    ap.add_argument("--mem", type=int, nargs=2, default=(500, 4000), metavar=("SMALL", "LARGE"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-mem", action="store_true", help="skip the memory runs (measure them on their own: their "
                    "peak does not depend on other jobs, the timings do)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument("--check-cuda", action="store_true",
                    help="first compare run_diff on CUDA (float64 accumulation) with the CPU (float32 staging) on a "
                         "small random model")
    ap.add_argument("--e2e", type=int, nargs="+", default=None, metavar="N",
                    help="time ec diff end to end (stream, tables, files) against the forward pass at these sizes")
    ap.add_argument("--mem-one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one memory run
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check_cuda:
        check_cuda(args)
    model = load(args)
    device = next(model.parameters()).device
    n_all = max(args.e2e) if args.e2e else max(args.n_speed, args.n_naive, *args.mem)
    pairs, source = make_pairs(model.tokenizer, n_all)
    if len(pairs) < n_all:
        print(f"only {len(pairs)} pairs available from {source}; reducing the sizes", file=sys.stderr)
    if args.mem_one:
        return mem_one(args, model, device, pairs)
    if args.e2e:
        return e2e_main(args, model, device, pairs, source)
    speed = pairs[: args.n_speed]
    lengths = [a.length for a in speed]
    print(f"model {args.model} on {device} ({args.dtype}, {cpu_name()}); {len(pairs)} pairs from {source}; "
          f"lengths {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.1f}); "
          f"{len(select_hooks(model))} default hook points ({', '.join(DEFAULT_HOOKS)})", flush=True)

    # Warm up (first calls allocate and pick kernels).
    floor_pass(model, speed[: args.batch_size], args.batch_size, device)
    streaming(model, speed[: args.batch_size], args.batch_size, device, sample_size=512)

    c_floor, c_stream = [], []
    for r in range(args.repeats):
        c_floor.append(floor_pass(model, speed, args.batch_size, device))
        c_stream.append(streaming(model, speed, args.batch_size, device, sample_size=512)[0])
        f, s_ = c_floor[-1], c_stream[-1]
        print(f"  repeat {r + 1}: floor {f.wall:.2f}s wall {f.cpu:.2f}s cpu  streaming {s_.wall:.2f}s wall "
              f"{s_.cpu:.2f}s cpu  ratio {s_.wall / f.wall:.3f} wall {s_.cpu / f.cpu:.3f} cpu", flush=True)
    t_floor = [c.wall for c in c_floor]
    t_stream = [c.wall for c in c_stream]
    ratios = [s / f for s, f in zip(t_stream, t_floor)]
    cpu_ratios = [s.cpu / f.cpu for s, f in zip(c_stream, c_floor)]
    per_pair_stream = statistics.median(t_stream) / len(speed)
    per_pair_stream_cpu = statistics.median(c.cpu for c in c_stream) / len(speed)

    nv = pairs[: args.n_naive]
    naive(model, nv[:1], device)
    with Clock(device) as c_naive:
        naive(model, nv, device)
    per_pair_naive = c_naive.wall / len(nv)
    per_pair_naive_cpu = c_naive.cpu / len(nv)

    # Each size in a fresh process: in this one, the runs above have left the allocator's heap in a state
    # that raises a later run's peak resident size by itself (measured: +14 % for 4,000 pairs after 500).
    mem = {}
    for n in ([] if args.no_mem else args.mem):
        peak, dt, k = memory_child(n)
        mem[n] = (peak, dt, k)
        print(f"  memory run {k} pairs (own process): peak {peak / 2**20:.0f} MiB, {dt:.1f}s "
              f"({k / dt:.1f} pairs/s)", flush=True)
    (n_s, (m_s, _, k_s)), (n_l, (m_l, _, k_l)) = list(mem.items()) or [(0, (math.nan, 0, 0)), (0, (math.nan, 0, 0))]
    out = {
        "model": args.model, "device": str(device), "cpu": cpu_name(), "dtype": args.dtype, "batch_size": args.batch_size,
        "pairs_source": source, "n_speed": len(speed), "n_naive": len(nv),
        "floor_s": t_floor, "streaming_s": t_stream,
        "ratio_streaming_over_floor_median": statistics.median(ratios),
        "ratio_streaming_over_floor_min": min(ratios),
        "floor_cpu_s": [c.cpu for c in c_floor], "streaming_cpu_s": [c.cpu for c in c_stream],
        "cpu_ratio_streaming_over_floor_median": statistics.median(cpu_ratios),
        "cpu_ratio_naive_over_streaming": per_pair_naive_cpu / per_pair_stream_cpu,
        "naive_s_per_pair": per_pair_naive, "streaming_s_per_pair": per_pair_stream,
        "ratio_naive_over_streaming": per_pair_naive / per_pair_stream,
        "peak_memory_bytes": {str(k_s): m_s, str(k_l): m_l},
        "ratio_peak_memory_large_over_small": m_l / m_s,
    }
    print()
    print(f"(2)/(1) streaming / plain forward:  {out['ratio_streaming_over_floor_median']:.3f}x median "
          f"(min {out['ratio_streaming_over_floor_min']:.3f}x) wall; "
          f"{out['cpu_ratio_streaming_over_floor_median']:.3f}x process CPU time   target <= 1.2x")
    print(f"(3)/(2) naive / streaming per pair: {out['ratio_naive_over_streaming']:.1f}x wall "
          f"({per_pair_naive * 1e3:.1f} vs {per_pair_stream * 1e3:.1f} ms/pair); "
          f"{out['cpu_ratio_naive_over_streaming']:.1f}x CPU time   target >= 10x")
    print(f"peak memory {k_l} / {k_s} pairs:     {out['ratio_peak_memory_large_over_small']:.3f} "
          f"({m_l / 2**20:.0f} vs {m_s / 2**20:.0f} MiB)   target <= 1.10")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
