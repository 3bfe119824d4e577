"""`make bench`: run every `bench/bench_*.py` in turn, each in its own process, and collect its figures.

Each benchmark prints whatever it likes and its figures as `key=value` pairs on its last line
(the contract's convention). This runner streams each one's output as it comes, then prints one
summary line per benchmark, `NAME: key=value ...`; it exits non-zero if any benchmark failed or
ended without a `key=value` line, so CI can tell a broken bench from a slow one.

Usage: python bench/run_all.py [--only SUBSTRING] [--list]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from service.lifetime import owned_child_env

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
_FIGURES = re.compile(r"^(\S+=\S+)(\s+\S+=\S+)*$")


def discover(only: str | None) -> list[Path]:
    """The benchmark scripts, in name order (a stable order makes runs comparable)."""
    scripts = sorted(BENCH_DIR.glob("bench_*.py"))
    return [s for s in scripts if only is None or only in s.stem]


def run_one(script: Path) -> tuple[int, str | None, float]:
    """Run one benchmark, echoing its output; return (exit code, its last key=value line, seconds)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    last: str | None = None
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=REPO_ROOT,
        env=owned_child_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if line.strip():
            last = line.strip()
    code = proc.wait()
    figures = last if last is not None and _FIGURES.match(last) else None
    return code, figures, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="run only benchmarks whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    scripts = discover(args.only)
    if args.list or not scripts:
        for s in scripts:
            print(s.stem)
        return 0 if scripts else 1

    results: list[tuple[str, int, str | None, float]] = []
    for script in scripts:
        print(f"===== {script.stem} =====", flush=True)
        code, figures, seconds = run_one(script)
        results.append((script.stem, code, figures, seconds))

    print("===== summary =====")
    failed = False
    for name, code, figures, seconds in results:
        if code != 0 or figures is None:
            failed = True
            print(f"{name}: FAILED (exit {code}, {'no key=value last line' if figures is None else 'see above'}) "
                  f"after {seconds:.0f} s")
        else:
            print(f"{name}: {figures}  ({seconds:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
