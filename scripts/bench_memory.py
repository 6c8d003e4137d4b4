"""Resident memory right after ``eclens.load_model()`` against the bytes of the model's parameters.

    python scripts/bench_memory.py                    # the embedded model (smollm2-135m), CPU
    python scripts/bench_memory.py --model random:smollm2-135m
    python scripts/bench_memory.py --stages           # also RSS after each step of the load

Target (issue 20): resident memory after loading ≤ 1.3x the parameters' and buffers' bytes plus what
the same process holds before loading anything (Python, torch, transformers and TransformerLens
imported: ``baseline``). Reports RSS (anonymous and file-backed apart: a mapped checkpoint shows as
file-backed pages), the peak (``VmHWM``) and the ratio; ``--stages`` repeats the load step by step
(transformers model, bridge boot, compatibility mode, verification) to say where memory stays.
Each measurement runs in a fresh process so that no earlier load leaves memory behind.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def status() -> dict[str, int]:
    """RSS, its anonymous and file-backed parts and the peak, in bytes (/proc/self/status)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


def model_bytes(model) -> int:
    """Bytes of the distinct parameter and buffer storages (a tied weight counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def child(args) -> dict:
    import torch  # noqa: F401
    import transformer_lens.model_bridge  # noqa: F401
    import transformers  # noqa: F401

    import eclens  # noqa: F401
    from eclens import model as M

    base = status()
    rec: dict = {"baseline": base}
    if args.stages:
        torch_dtype = M.torch_dtype_of(args.dtype)
        res = M.resolve_source(args.model, torch_dtype)
        rec["after_transformers"] = status()
        rec["transformers_bytes"] = model_bytes(res.hf) if res.hf is not None else None
        b = M._bridge_from_hf(res, device="cpu", dtype=torch_dtype, compat=False)
        del res
        rec["after_boot"] = status()
        b.enable_compatibility_mode(disable_warnings=True)
        rec["after_compat"] = status()
        m = b
    else:
        m = eclens.load_model(args.model, dtype=args.dtype, verify=args.verify)
    rec["after_load"] = status()
    rec["param_bytes"] = model_bytes(m)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--verify", default="auto", help="auto (as load_model by default) or never")
    ap.add_argument("--stages", action="store_true", help="also measure the load step by step")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("MEMORY " + json.dumps(child(args)), flush=True)
        return 0
    runs = {}
    for stages in ([False, True] if args.stages else [False]):
        argv = [sys.executable, __file__, "--child", "--model", args.model, "--dtype", args.dtype,
                "--verify", args.verify] + (["--stages"] if stages else [])
        r = subprocess.run(argv, capture_output=True, text=True)
        line = next((x for x in r.stdout.splitlines() if x.startswith("MEMORY ")), None)
        if r.returncode or line is None:
            raise SystemExit(f"measurement failed: {r.stderr[-2000:]}")
        runs["stages" if stages else "load_model"] = json.loads(line[len("MEMORY "):])
    mb = 1 << 20
    rec = runs["load_model"]
    base, after, pb = rec["baseline"], rec["after_load"], rec["param_bytes"]
    grown = after["VmRSS"] - base["VmRSS"]
    print(f"{args.model} ({args.dtype}): parameters+buffers {pb / mb:.0f} MB; baseline RSS {base['VmRSS'] / mb:.0f} MB "
          f"(torch, transformers, TransformerLens imported)")
    print(f"after load_model: RSS {after['VmRSS'] / mb:.0f} MB (anon {after['RssAnon'] / mb:.0f}, file "
          f"{after['RssFile'] / mb:.0f}), peak {after['VmHWM'] / mb:.0f} MB; grown by {grown / mb:.0f} MB = "
          f"{grown / pb:.2f}x the parameters (target <= 1.3x)")
    if "stages" in runs:
        s = runs["stages"]
        for k in ("baseline", "after_transformers", "after_boot", "after_compat", "after_load"):
            v = s[k]
            print(f"  {k:20s} RSS {v['VmRSS'] / mb:6.0f} MB  anon {v['RssAnon'] / mb:6.0f}  file "
                  f"{v['RssFile'] / mb:6.0f}  peak {v['VmHWM'] / mb:6.0f}")
    if args.json:
        args.json.write_text(json.dumps({"ratio": grown / pb, **runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
