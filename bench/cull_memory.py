"""
Peak memory and time of culling a large cache, for this checkout's
``pkgcache/cull.py`` and for a baseline's (by default the last one that
sorted every file in memory).

Run it by hand (see bench/README.md, "Culling a large cache"); the test
suite never runs it.  For each number of files it builds a cache of that
many small sparse files (random sizes and atimes, the same for both
versions) in a temporary directory, culls it to half its size in a
subprocess, and takes that subprocess's peak RSS from ``wait4``.  The
files removed are made again before the other version's run.  The
directory is removed at the end, on Ctrl-C and on TERM.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

CHECKOUT = Path(__file__).resolve().parent.parent
#: The last commit whose ``cull`` sorted a list of every file.
BASELINE = "e4de05b"
SEED = 20261202

#: Runs in the subprocess: loads the cull module from a file, culls, and
#: prints what it did.  Its peak RSS after the imports is printed too, to
#: tell the cull's own memory from the interpreter's and the imports'.
CHILD = """
import importlib.util, json, resource, sys, time
checkout, module_path, root, max_size = sys.argv[1:]
sys.path.insert(0, checkout)
spec = importlib.util.spec_from_file_location("cull_under_test", module_path)
module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
imports_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
walks = 0
def progress(stage, done, total):
    global walks
    walks += done == 0
start = time.perf_counter()
report = module.cull(root, int(max_size), progress=progress)
print(json.dumps({
    "seconds": time.perf_counter() - start,
    "imports_kib": imports_kib,
    "walks": walks,
    "removed_files": report.removed_files,
    "removed_bytes": report.removed_bytes,
    "left_files": report.left_files,
    "left_bytes": report.left_bytes,
}))
"""


def cache_files(
    count: int, flat: bool, now: int, within_ns: int
) -> Iterator[tuple[str, int, int]]:
    """``(relative path, size, atime_ns)`` of every file, the same each time."""
    rng = random.Random(SEED)
    for index in range(count):
        directory = "flat" if flat else f"pool/{index % 64:02x}/{index // 64 % 256:02x}"
        yield f"{directory}/pkg-{index}.tar", rng.randrange(1, 65536), now - rng.randrange(within_ns)


def make_missing_files(root: Path, count: int, flat: bool, now: int, within_ns: int) -> int:
    """
    Make every file of the cache that is not there (all, the first time);
    sparse, so that a million of them take inodes but no blocks.

    :return: their total size.
    """
    total = 0
    for relative, size, atime in cache_files(count, flat, now, within_ns):
        total += size
        path = os.path.join(root, relative)
        if os.path.exists(path):
            continue
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        os.utime(path, ns=(atime, atime))
    return total


def run_cull(module: Path, root: Path, max_size: int) -> dict:
    """Cull ``root`` in a subprocess with ``module``'s ``cull``; its figures."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(CHECKOUT), str(module), str(root), str(max_size)],
        stdout=subprocess.PIPE,
    )
    output = child.stdout.read()
    child.stdout.close()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"the cull with {module} failed with status {child.returncode}")
    figures = json.loads(output)
    figures["peak_kib"] = usage.ru_maxrss  # KiB on Linux
    return figures


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--files", type=int, nargs="+", default=[100_000, 1_000_000], metavar="N",
        help="sizes of the caches to build (default: 100000 1000000)",
    )
    parser.add_argument(
        "--baseline", default=BASELINE, metavar="REV",
        help=f"the commit whose pkgcache/cull.py to compare with (default: {BASELINE})",
    )
    parser.add_argument(
        "--flat", action="store_true",
        help="every file in one directory, rather than 16384 directories",
    )
    parser.add_argument(
        "--atimes-within", type=float, default=90 * 86400, metavar="SECONDS",
        help="atimes drawn from the last SECONDS (default: 90 days); 1 makes the "
        "boundary bucket full, and the cull walk more to split it",
    )
    parser.add_argument(
        "--tmp", default=os.environ.get("PKGCACHE_BENCH_TMP", "/var/tmp"), metavar="DIR",
        help="where to make the temporary directory (default: $PKGCACHE_BENCH_TMP or /var/tmp)",
    )
    args = parser.parse_args()
    within_ns = max(1, round(args.atimes_within * 10**9))
    # TERM, like Ctrl-C, ends in the finally below, which cleans up.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))

    work = Path(tempfile.mkdtemp(prefix="pkgcache-cull-bench-", dir=args.tmp))
    try:
        baseline = work / "baseline_cull.py"
        baseline.write_bytes(
            subprocess.run(
                ["git", "-C", str(CHECKOUT), "show", f"{args.baseline}:pkgcache/cull.py"],
                check=True, capture_output=True,
            ).stdout
        )
        versions = {"this checkout": CHECKOUT / "pkgcache" / "cull.py", args.baseline: baseline}
        print(f"{'files':>9}  {'version':<14} {'peak RSS':>10} {'after imports':>14} "
              f"{'cull itself':>12} {'time':>8} {'walks':>6}  removed / left")
        for count in args.files:
            root = work / "cache"
            (root / ".pkgcache-spool").mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            # Atimes counted from one moment, so that the files made again
            # for the second version's run are the same.
            now = time.time_ns()
            total = make_missing_files(root, count, args.flat, now, within_ns)
            print(f"# built {count} files ({total} bytes) in {time.monotonic() - started:.0f} s",
                  flush=True)
            reports = []
            for name, module in versions.items():
                make_missing_files(root, count, args.flat, now, within_ns)
                figures = run_cull(module, root, total // 2)
                growth = figures["peak_kib"] - figures["imports_kib"]
                print(f"{count:>9}  {name:<14} {mib(figures['peak_kib']):>10} "
                      f"{mib(figures['imports_kib']):>14} {mib(growth):>12} "
                      f"{figures['seconds']:>7.1f}s {figures['walks'] or '-':>6}  "
                      f"{figures['removed_files']} / {figures['left_files']} files",
                      flush=True)
                reports.append({key: figures[key] for key in
                                ("removed_files", "removed_bytes", "left_files", "left_bytes")})
            if any(report != reports[0] for report in reports):
                print(f"# the versions did not remove the same files: {reports}")
            shutil.rmtree(root)
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
