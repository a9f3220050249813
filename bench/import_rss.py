"""
What each import adds to a process's resident memory: VmRSS after
importing each module named, in turn, in the Python that runs it.

    /tmp/venv-bench/bin/python bench/import_rss.py twisted.internet.reactor \\
        twisted.web.server twisted.web.client treq prometheus_client \\
        pkgcache.resource pkgcache.tap twisted.application.twist._twist
"""

import importlib
import sys


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    before = rss_mib()
    print(f"{'(start)':45s}          {before:5.1f} MiB")
    for name in sys.argv[1:]:
        importlib.import_module(name)
        now = rss_mib()
        print(f"{name:45s} +{now - before:5.1f} = {now:5.1f} MiB")
        before = now


if __name__ == "__main__":
    main()
