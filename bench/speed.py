"""
The speed step (``bench/run --only speed``): pkgcache with one worker and
with two (``--workers 2``) against nginx ``proxy_cache`` with two workers
and ``sendfile on``, on the scenarios and targets of the speed issue.
nginx runs with ``tcp_nopush off`` here: with it on, each 100 KiB answer
on a busy keep-alive connection waits about 45 ms (delayed ACKs), which
would make nginx look 10x slower than it is on the many-files scenario.

Each scenario runs its subjects in turn, ``repeats`` times, and gives each
figure as a ratio to nginx's median in the same run: cached 4 KiB files
under wrk (req/s and p99), a cached 1 GiB file to 1 and 4 clients, 200
files of 100 KiB over 8 clients (cold, then warm), a cold 1 GiB miss
(throughput and time to the first byte), 20 clients at once on one
uncached file (upstream requests, first byte), and memory (idle RSS of each
process, peak RSS of each on a 1 GiB miss with a slow client).

It uses the harness of ``bench.py`` (its processes, clients and table).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import bench as harness
from bench import MiB, Row, human

NGINX_WORKERS = 2
#: The targets, for pkgcache --workers 2, as ratios to nginx.
HIT_RATE_TARGET = 0.5
HIT_P99_TARGET = 2.0
BIG_HIT_TARGET = 0.9
MANY_FILES_TARGET = 1.5
MISS_TARGET = 0.95
FIRST_BYTE_TARGET = 2.0
BURST_CLIENTS = 20
BURST_FIRST_BYTE_TARGET = 0.050
IDLE_RSS_TARGET = 40 * MiB
PEAK_RSS_TARGET = 64 * MiB
#: The many-files scenario: this many files of this size, over this many
#: clients (each a curl fetching its share on one keep-alive connection).
MANY_FILES = 200
MANY_FILE_SIZE = 100 * 1024
MANY_CLIENTS = 8
HIT_CONNECTIONS = 64

#: One line per transfer: status, bytes, total and first-byte seconds.
CURL_TIMES = "%{http_code} %{size_download} %{time_total} %{time_starttransfer}\\n"


@dataclass
class Transfer:
    code: int
    size: int
    seconds: float
    first_byte: float


@dataclass
class Subject:
    """One server measured: nginx, or a pkgcache with so many workers."""

    name: str
    port: int
    process: subprocess.Popen
    cache: Optional[Path] = None
    workers: int = 1

    @property
    def is_nginx(self) -> bool:
        return self.cache is None

    @property
    def slug(self) -> str:
        """Its part of the paths it is asked for, so that the origin's log tells subjects apart."""
        return "nginx" if self.is_nginx else f"w{self.workers}"

    def url(self, label: str, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/v/{label}/{name}"

    def all_pids(self) -> list[int]:
        """The pkgcache process and its workers, if any."""
        return [self.process.pid, *harness.children_of(self.process.pid)]


def curl(urls: list[str], limit_rate: Optional[str] = None) -> list[str]:
    """A curl fetching ``urls`` one after another on one connection, to /dev/null."""
    argv = ["curl", "-s", "-w", CURL_TIMES]
    if limit_rate:
        argv += ["--limit-rate", limit_rate]
    for url in urls:
        argv += ["-o", "/dev/null", url]
    return argv


def transfers(argvs: list[list[str]], expected_size: int) -> tuple[float, list[Transfer]]:
    """Run the curls at once: the wall time until the last ends, and every transfer, checked."""
    started = time.monotonic()
    running = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for argv in argvs]
    found = []
    for process in running:
        out, err = process.communicate(timeout=900)
        if process.returncode != 0:
            raise RuntimeError(f"curl failed: exit {process.returncode} {err}")
        for line in out.splitlines():
            code, size, total, first = line.split()
            found.append(Transfer(int(code), int(size), float(total), float(first)))
    wall = time.monotonic() - started
    for transfer in found:
        if transfer.code != 200 or transfer.size != expected_size:
            raise RuntimeError(f"HTTP {transfer.code}, {transfer.size} bytes, "
                               f"wanted 200 and {expected_size}")
    return wall, found


class Speed:
    def __init__(self, bench: "harness.Bench") -> None:
        self.bench = bench
        self.sizes = bench.sizes
        self.repeats = bench.sizes.repeats
        self.subjects: list[Subject] = []
        #: The RSS of each pkgcache's largest process once started and warmed up.
        self.idle_rss: dict[str, int] = {}

    # setup

    def start(self) -> None:
        bench = self.bench
        for index in range(MANY_FILES):
            path = bench.files / "many" / f"f{index:03d}.bin"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(os.urandom(MANY_FILE_SIZE))
        port = harness.free_port()
        directory = bench.work / "nginx-speed"
        nginx = harness.start_nginx(
            bench.processes, directory,
            harness.PROXY_CACHE_PATH.format(dir=directory) + harness.PROXY_SERVER.format(
                port=port, dir=directory, origin_port=bench.origin_port,
                listen_options=" backlog=1024",
            ),
            [port], workers=NGINX_WORKERS, nopush=False,
        )
        self.nginx_cache = directory / "cache"
        self.subjects.append(Subject(f"nginx ({NGINX_WORKERS} workers)", port, nginx))
        for workers in (1, 2):
            if workers > 1 and not self.workers_supported():
                bench.log("  this pkgcache has no --workers: measuring one worker only")
                continue
            process, port, cache = bench.start_pkgcache(
                options=("--workers", str(workers)), listen_options=":backlog=1024"
            ) if workers > 1 else bench.start_pkgcache(listen_options=":backlog=1024")
            subject = Subject(f"pkgcache --workers {workers}", port, process, cache, workers)
            self.subjects.append(subject)
            self.idle_rss[subject.name] = max(
                harness.status_kib(pid, "VmRSS") * 1024 for pid in subject.all_pids()
            )

    def workers_supported(self) -> bool:
        help_text = subprocess.run([self.bench.args.twist, "pkgcache", "--help"],
                                   capture_output=True, text=True).stdout
        return "--workers" in help_text

    def stop(self) -> None:
        for subject in self.subjects:
            if subject.is_nginx:
                self.bench.processes.stop(subject.process)
            else:
                self.bench.stop_pkgcache(subject.process, subject.cache)

    @property
    def nginx(self) -> Subject:
        return self.subjects[0]

    def forget(self, subject: Subject, label: str) -> None:
        """Remove what ``label``'s requests cached, so that the disk use stays bounded."""
        if subject.is_nginx:
            for entry in self.nginx_cache.glob("*"):
                shutil.rmtree(entry, ignore_errors=True)
        else:
            self.bench.drop_published(subject.cache, label)

    def rounds(self):
        """``(round, subject)``, each round starting with another subject."""
        for rep in range(self.repeats):
            shift = rep % len(self.subjects)
            for subject in self.subjects[shift:] + self.subjects[:shift]:
                yield rep, subject

    def add_compared(self, section: str, what: str, values: dict[str, list[float]], unit: str,
                     *, higher_is_better: bool, target: Optional[float] = None) -> None:
        """A row per subject (median, and its ratio to nginx's); the target is checked for --workers 2."""
        reference = statistics.median(values[self.nginx.name])
        for subject in self.subjects:
            value = statistics.median(values[subject.name])
            ratio = value / reference if reference else float("nan")
            row = Row(section, f"{subject.name}: {what}", value, unit, ratio=ratio,
                      ratio_to="of nginx", samples=values[subject.name])
            if target is not None and subject.workers == 2:
                row.target = f"{'>=' if higher_is_better else '<='} {target}x nginx"
                row.met = ratio >= target if higher_is_better else ratio <= target
            self.bench.add(row)

    # scenarios

    def small_hits(self) -> None:
        size, seconds = self.sizes.small, self.sizes.wrk_seconds
        section = f"{human(size)} hits (wrk -t2 -c{HIT_CONNECTIONS} -d{seconds}s)"
        script = self.bench.work / "summary.lua"
        script.write_text(harness.WRK_SCRIPT)
        rates: dict[str, list[float]] = {s.name: [] for s in self.subjects}
        p99s: dict[str, list[float]] = {s.name: [] for s in self.subjects}
        for subject in self.subjects:
            for _ in range(2):
                harness.fetch(subject.url("speed-hits", "small.bin"), size)
            if not subject.is_nginx:
                self.bench.wait_published(subject.cache, "speed-hits", "small.bin", size)
        before = self.bench.upstream_requests("speed-hits")
        for rep, subject in self.rounds():
            found = harness.wrk(subject.url("speed-hits", "small.bin"), 2, HIT_CONNECTIONS,
                                seconds, script)
            rates[subject.name].append(found["requests_per_second"])
            p99s[subject.name].append(found["p99_us"] / 1e6)
            self.bench.log(f"  4 KiB hits {subject.name} #{rep}: "
                           f"{found['requests_per_second']:.0f} req/s, p99 {found['p99_us'] / 1000:.1f} ms")
        if self.bench.upstream_requests("speed-hits") != before:
            raise RuntimeError("4 KiB hits went to the origin")
        self.add_compared(section, "req/s", rates, "req/s", higher_is_better=True,
                          target=HIT_RATE_TARGET)
        self.add_compared(section, "p99 latency", p99s, "s", higher_is_better=False,
                          target=HIT_P99_TARGET)

    def big_hits(self) -> None:
        size = self.sizes.big
        section = f"{human(size)} hits"
        for subject in self.subjects:
            harness.fetch(subject.url("speed-big", "big.bin"), size)
            if not subject.is_nginx:
                self.bench.wait_published(subject.cache, "speed-big", "big.bin", size)
            self.bench.settle()
        for clients in (1, 4):
            rates: dict[str, list[float]] = {s.name: [] for s in self.subjects}
            for rep, subject in self.rounds():
                wall, _ = transfers([curl([subject.url("speed-big", "big.bin")])] * clients, size)
                rates[subject.name].append(clients * size / wall)
                self.bench.log(f"  {human(size)} hit x{clients} {subject.name} #{rep}: {wall:.3f} s")
            self.add_compared(section, f"throughput, {clients} client{'s' * (clients > 1)}",
                              rates, "B/s", higher_is_better=True, target=BIG_HIT_TARGET)
        for subject in self.subjects:
            self.forget(subject, "speed-big")

    def many_files(self) -> None:
        section = (f"{MANY_FILES} x {human(MANY_FILE_SIZE)} files, {MANY_CLIENTS} clients "
                   f"({MANY_FILES // MANY_CLIENTS} files each)")
        cold: dict[str, list[float]] = {s.name: [] for s in self.subjects}
        warm: dict[str, list[float]] = {s.name: [] for s in self.subjects}
        # Removed after the last round, not after each (20 MiB a round): a
        # removal between rounds would be paid for in the next round, when
        # pkgcache pushes out the descriptors it kept of the removed files
        # and their last close frees their blocks.
        measured: list[tuple[Subject, str]] = []
        for rep, subject in self.rounds():
            label = f"speed-many-{subject.slug}-{rep}"
            measured.append((subject, label))
            argvs = [
                curl([subject.url(label, f"many/f{index:03d}.bin")
                      for index in range(client, MANY_FILES, MANY_CLIENTS)])
                for client in range(MANY_CLIENTS)
            ]
            cold[subject.name].append(transfers(argvs, MANY_FILE_SIZE)[0])
            if not subject.is_nginx:
                for index in range(MANY_FILES):
                    self.bench.wait_published(subject.cache, label, f"many/f{index:03d}.bin",
                                              MANY_FILE_SIZE)
            warm[subject.name].append(transfers(argvs, MANY_FILE_SIZE)[0])
            upstream = self.bench.upstream_requests(label)
            if upstream != MANY_FILES:
                raise RuntimeError(f"{subject.name}: {upstream} upstream requests for "
                                   f"{MANY_FILES} files fetched cold then warm")
            self.bench.log(f"  many files {subject.name} #{rep}: cold {cold[subject.name][-1]:.3f} s, "
                           f"warm {warm[subject.name][-1]:.3f} s")
        for subject, label in measured:
            self.forget(subject, label)
        self.add_compared(section, "time, cold", cold, "s", higher_is_better=False,
                          target=MANY_FILES_TARGET)
        self.add_compared(section, "time, warm", warm, "s", higher_is_better=False,
                          target=MANY_FILES_TARGET)

    def cold_miss(self) -> None:
        size = self.sizes.big
        section = f"{human(size)} cold miss, origin unthrottled"
        rates: dict[str, list[float]] = {s.name: [] for s in self.subjects}
        first: dict[str, list[float]] = {s.name: [] for s in self.subjects}
        for rep, subject in self.rounds():
            label = f"speed-miss-{subject.slug}-{rep}"
            _, [transfer] = transfers([curl([subject.url(label, "big.bin")])], size)
            rates[subject.name].append(size / transfer.seconds)
            first[subject.name].append(transfer.first_byte)
            if not subject.is_nginx:
                self.bench.wait_published(subject.cache, label, "big.bin", size)
            self.bench.log(f"  cold miss {subject.name} #{rep}: {transfer.seconds:.3f} s, "
                           f"first byte {transfer.first_byte * 1000:.1f} ms")
            self.forget(subject, label)
            self.bench.settle()
        self.add_compared(section, "throughput", rates, "B/s", higher_is_better=True,
                          target=MISS_TARGET)
        self.add_compared(section, "time to first byte", first, "s", higher_is_better=False,
                          target=FIRST_BYTE_TARGET)

    def burst(self) -> None:
        size = self.sizes.mid
        section = f"{BURST_CLIENTS} clients at once on one uncached {human(size)} file"
        for rep, subject in self.rounds():
            label = f"speed-burst-{subject.slug}-{rep}"
            url = subject.url(label, "mid.bin")
            wall, found = transfers([curl([url])] * BURST_CLIENTS, size)
            if not subject.is_nginx:
                self.bench.wait_published(subject.cache, label, "mid.bin", size)
            time.sleep(0.1)  # the origin logs a request once it is done
            upstream = self.bench.upstream_requests(label)
            median_first = statistics.median(t.first_byte for t in found)
            self.bench.log(f"  burst {subject.name} #{rep}: {wall:.3f} s, {upstream} upstream, "
                           f"median first byte {median_first * 1000:.1f} ms")
            if rep == 0:
                self.bench.add(Row(section, f"{subject.name}: upstream requests", upstream,
                                   "requests", target="1", met=upstream == 1))
                row = Row(section, f"{subject.name}: median time to first byte", median_first, "s")
                if subject.workers == 2:
                    row.target = f"< {BURST_FIRST_BYTE_TARGET * 1000:.0f} ms"
                    row.met = median_first < BURST_FIRST_BYTE_TARGET
                self.bench.add(row)
            self.forget(subject, label)
            self.bench.settle()

    def memory(self) -> None:
        size = self.sizes.big
        section = f"memory per process ({human(size)} miss: one client at 1 MB/s, one at full speed)"
        for subject in self.subjects:
            if subject.is_nginx:
                continue
            idle = self.idle_rss[subject.name]
            self.bench.add(Row(section, f"{subject.name}: idle RSS, largest process", idle,
                               "bytes", target=f"<= {human(IDLE_RSS_TARGET)}",
                               met=idle <= IDLE_RSS_TARGET))
            label = f"speed-slow-{subject.slug}"
            watches = [harness.RssWatch(pid) for pid in subject.all_pids()]
            slow = self.bench.processes.start(
                curl([subject.url(label, "big.bin")], limit_rate="1M"),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            time.sleep(0.2)
            transfers([curl([subject.url(label, "big.bin")])], size)
            self.bench.wait_published(subject.cache, label, "big.bin", size)
            peak = max(watch.finish()["peak_bytes"] for watch in watches)
            self.bench.processes.stop(slow)
            self.bench.add(Row(section, f"{subject.name}: peak RSS, largest process", peak,
                               "bytes", target=f"<= {human(PEAK_RSS_TARGET)}",
                               met=peak <= PEAK_RSS_TARGET))
            self.forget(subject, label)

    def run(self) -> None:
        self.start()
        try:
            for step in (self.small_hits, self.big_hits, self.many_files, self.cold_miss,
                         self.burst, self.memory):
                self.bench.log(f" speed: {step.__name__.replace('_', ' ')}")
                step()
        finally:
            self.stop()
