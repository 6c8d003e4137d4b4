"""Refresh the README's screenshots (docs/web-ui.png, docs/report.png) from the browser sweep's.

    python scripts/screenshots.py              # run the sweep into docs/screenshots/, then copy
    python scripts/screenshots.py --from DIR   # copy from a folder a sweep already wrote

The sweep (tests/test_browser.py) writes one screenshot per web-UI route and report section
to the folder ``ECLENS_SCREENSHOTS`` names; the tests never touch docs/ themselves.
docs/screenshots/ is git-ignored: only the two README images are tracked.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PICKS = {"web-pair.png": "web-ui.png", "report.png": "report.png"}  # sweep screenshot -> README image


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="src", type=Path, help="a folder of sweep screenshots (default: run the sweep)")
    args = ap.parse_args(argv)
    src = args.src
    if src is None:
        src = ROOT / "docs" / "screenshots"
        src.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "ECLENS_SCREENSHOTS": str(src), "HF_HUB_OFFLINE": "1"}
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "tests/test_browser.py", "-k", "sweep_web_ui or sweep_report"], cwd=ROOT, env=env)
        if rc != 0:
            print(f"the browser sweep failed (exit {rc}); the README's screenshots were not changed", file=sys.stderr)
            return rc
    missing = [name for name in PICKS if not (src / name).is_file()]
    if missing:
        print(f"{src}: no {', '.join(missing)}; run the sweep first (python scripts/screenshots.py)", file=sys.stderr)
        return 1
    for name, dest in PICKS.items():
        shutil.copyfile(src / name, ROOT / "docs" / dest)
        print(f"docs/{dest} <- {src / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
