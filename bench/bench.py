#!/usr/bin/env python3
"""
Benchmark pkgcache against downloading straight from an nginx origin and
against nginx ``proxy_cache`` (with ``proxy_cache_lock on``), all on
127.0.0.1, in one run.

Run it through ``bench/run``, which installs nginx, wrk and curl, installs
pkgcache (not editable) into a venv and makes the work directory.  This
file uses the standard library only; the clients are curl and wrk.

Every speed is reported as a ratio to something measured in the same run
(a direct download from the origin, or nginx doing the same job), because
the machines this runs on are shared and noisy: an absolute MB/s figure
from one run says little about the next.

What is measured, for pkgcache and for nginx proxy_cache side by side:

1. a 1 GiB miss, the origin unthrottled (loopback speed) and throttled to
   a realistic mirror speed (nginx ``limit_rate``, 100 MiB/s);
2. a 1 GiB hit;
3. 20 concurrent clients on one uncached 100 MB file (upstream requests,
   wall time), against one client on the same kind of file;
4. the slow reader: peak RSS growth while a 1 GiB file is downloaded by one
   client at 1 MB/s and one at full speed;
5. with wrk: hit throughput on a large cached file, and 4 KiB hits per
   second;
6. freshness (``--only freshness``): 200 keep-alive clients asking at the
   same moment for one stale index (upstream requests per burst, latency),
   and, with wrk, fresh volatile hits against immutable hits (pkgcache
   only).
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import math
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

MiB = 1024 * 1024
GiB = 1024 * MiB

#: The slow-reader target: pkgcache's peak RSS must grow by less than this.
RSS_GROWTH_LIMIT = 32 * MiB
#: The other targets (issue): a miss within 1.15x of a direct download, and
#: 20 coalesced clients within 1.3x of one.
MISS_TARGET = 1.15
COALESCED_TARGET = 1.3
#: The mirror speed the throttled origin is limited to (nginx limit_rate).
THROTTLE = "100m"
THROTTLE_LABEL = "100 MiB/s"
#: The freshness steps: how many keep-alive clients ask at once for one
#: stale index, the max-age (seconds) of pkgcache and of nginx in that
#: burst, and the index's size (a Release-like text file).  Each stale burst
#: is followed at once by a burst of fresh hits, which must start within
#: the max-age: 2 s leaves room for a slow stale burst on a busy machine.
BURST_CLIENTS = 200
BURST_MAX_AGE = 2
INDEX_SIZE = 300 * 1024
#: Where the freshness files lie on the origin (it serves /v/LABEL/PATH as
#: /PATH): an index, two small volatile files and a small immutable one.
INDEX_PATH = "dists/stable/InRelease"
VOLATILE_INDEX_PATH = "dists/stable/main/binary-amd64/Packages.xz"
VOLATILE_PAGE_PATH = "simple/foo/"
IMMUTABLE_PATH = "pool/main/f/foo/foo_1.0_all.deb"
#: wrk connections for the fresh-hit step, and its target: a fresh
#: volatile hit serves at least this share of the immutable hits' rate
#: (1.0, less the noise between runs).
FRESH_HIT_CONNECTIONS = 64
FRESH_HIT_TARGET = 0.95


@dataclass
class Sizes:
    big: int
    mid: int
    small: int
    #: Each timing is the median of this many runs, taken in turn with the
    #: runs it is compared to (the 1 GiB miss from the throttled origin
    #: takes 11 s a run: it gets fewer).
    repeats: int
    throttled_miss_repeats: int
    wrk_seconds: int
    clients: int = 20

    @classmethod
    def full(cls) -> "Sizes":
        return cls(big=GiB, mid=100 * 1000 * 1000, small=4096, repeats=5,
                   throttled_miss_repeats=3, wrk_seconds=10)

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(big=64 * MiB, mid=16 * MiB, small=4096, repeats=1,
                   throttled_miss_repeats=1, wrk_seconds=3)


# -- processes ----------------------------------------------------------------


class Processes:
    """
    Every process the benchmark starts, each in a session of its own so that
    it and its children (nginx's workers) can be ended together.  Their
    process-group ids are also written to ``WORKDIR/pids``, for ``bench/run``
    to end them if this script itself is killed.
    """

    def __init__(self, workdir: Path) -> None:
        self._pids_file = workdir / "pids"
        self._running: list[subprocess.Popen] = []

    def start(self, argv: list[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self._running.append(process)
        self._write_pids()
        return process

    def _write_pids(self) -> None:
        # Only live ones: a pid of a process already ended may be reused.
        self._pids_file.write_text("".join(f"{p.pid}\n" for p in self._running))

    def stop(self, process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        """End ``process`` and its process group; SIGKILL after 10 s."""
        if process.poll() is None:
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Children left in the group (nginx workers) go too.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if process in self._running:
            self._running.remove(process)
            self._write_pids()

    def stop_all(self) -> None:
        for process in reversed(list(self._running)):
            self.stop(process)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:g}s")


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def status_kib(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


class RssWatch:
    """
    The peak RSS of a process from now on: the kernel's own high-water mark
    (``VmHWM``, reset through ``clear_refs``) and, as a cross-check, the
    highest ``VmRSS`` seen by polling every 10 ms.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = status_kib(pid, "VmRSS") * 1024
        self.polled_peak = self.baseline
        self._reset_hwm = True
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as clear:
                clear.write("5")
        except OSError:
            self._reset_hwm = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            try:
                rss = status_kib(self.pid, "VmRSS") * 1024
            except (OSError, KeyError):
                return
            self.polled_peak = max(self.polled_peak, rss)

    def finish(self) -> dict:
        self._stop.set()
        self._thread.join()
        peak = self.polled_peak
        if self._reset_hwm:
            peak = max(peak, status_kib(self.pid, "VmHWM") * 1024)
        return {
            "baseline_bytes": self.baseline,
            "peak_bytes": peak,
            "growth_bytes": peak - self.baseline,
            "polled_peak_bytes": self.polled_peak,
            "hwm_reset": self._reset_hwm,
        }


# -- nginx ----------------------------------------------------------------------

NGINX_COMMON = """\
worker_processes {workers};
daemon off;
master_process on;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;
    types {{ }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush {nopush};
    keepalive_requests 1000000;
    log_format bench '$request_uri $status $body_bytes_sent $request_time $upstream_cache_status';
{servers}
}}
"""

# /v/LABEL/NAME serves NAME: every measurement asks for a path of its own,
# so it is a miss for both caches, and the origin's access log tells how
# many times each was fetched.
ORIGIN_SERVER = """\
    server {{
        listen 127.0.0.1:{port};
        access_log {dir}/{log} bench;
        root {files};
        {limit}
        location /v/ {{ rewrite ^/v/[^/]+/(.+)$ /$1 break; }}
    }}
"""

# proxy_cache_lock_timeout is raised from its default of 5 s: past it nginx
# sends waiting clients to the origin too (uncached), which is not the
# coalescing being compared.
PROXY_SERVER = """\
    server {{
        listen 127.0.0.1:{port}{listen_options};
        access_log {dir}/proxy-access.log bench;
        location / {{
            proxy_pass http://127.0.0.1:{origin_port};
            proxy_cache bench;
            proxy_cache_valid 200 1d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 10m;
            proxy_cache_lock_age 10m;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
    }}
"""

PROXY_CACHE_PATH = """\
    proxy_cache_path {dir}/cache levels=1:2 keys_zone=bench:16m max_size=64g inactive=1d use_temp_path=off;
"""

# The freshness comparison: nginx revalidating a cached file with the origin
# (a conditional GET) once it is older than {max_age} seconds, while the
# other clients of that file get the stale copy (UPDATING) meanwhile.
FRESH_PROXY_SERVER = """\
    proxy_cache_path {dir}/cache levels=1:2 keys_zone=fresh:4m max_size=1g inactive=1d use_temp_path=off;
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        access_log {dir}/proxy-access.log bench;
        location / {{
            proxy_pass http://127.0.0.1:{origin_port};
            proxy_cache fresh;
            proxy_cache_valid 200 {max_age}s;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 10m;
            proxy_cache_lock_age 10m;
            proxy_cache_revalidate on;
            proxy_cache_use_stale updating;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
    }}
"""


def start_nginx(
    processes: Processes, directory: Path, servers: str, ports: list[int], workers: int = 1,
    nopush: bool = True,
) -> subprocess.Popen:
    directory.mkdir(parents=True)
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_COMMON.format(
        dir=directory, servers=servers, workers=workers, nopush="on" if nopush else "off"
    ))
    test = subprocess.run(
        ["nginx", "-t", "-q", "-p", str(directory), "-e", str(directory / "error.log"),
         "-c", str(conf)],
        capture_output=True, text=True,
    )
    if test.returncode != 0:
        raise RuntimeError(f"nginx config {conf} rejected:\n{test.stderr}")
    process = processes.start(
        ["nginx", "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)],
        stdout=subprocess.DEVNULL, stderr=open(directory / "stderr.log", "wb"),
    )
    for port in ports:
        wait_for_port(port, process, f"nginx ({directory.name})")
    return process


def nginx_workers(master: subprocess.Popen) -> list[int]:
    """The pids of the workers (not the cache manager or loader) under ``master``."""
    workers = []
    for pid in children_of(master.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"worker process" in cmdline.read():
                    workers.append(pid)
        except OSError:
            continue
    return workers


def nginx_worker(master: subprocess.Popen) -> int:
    """The pid of the one worker under ``master``."""
    workers = nginx_workers(master)
    if len(workers) != 1:
        raise RuntimeError(f"expected one nginx worker under {master.pid}, found {workers}")
    return workers[0]


# -- clients ----------------------------------------------------------------------

CURL_FORMAT = "%{http_code} %{size_download} %{time_total} %header{x-cache-status}\\n"


@dataclass
class Fetch:
    code: int
    size: int
    seconds: float
    cache_status: str


def curl_argv(url: str, limit_rate: Optional[str] = None) -> list[str]:
    argv = ["curl", "-s", "-o", "/dev/null", "-w", CURL_FORMAT]
    if limit_rate:
        argv += ["--limit-rate", limit_rate]
    return argv + [url]


def parse_curl(output: str) -> Fetch:
    parts = output.split()
    return Fetch(int(parts[0]), int(parts[1]), float(parts[2]), parts[3] if len(parts) > 3 else "")


def fetch(url: str, expected_size: int) -> Fetch:
    done = subprocess.run(curl_argv(url), capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"curl {url} failed: exit {done.returncode} {done.stderr}")
    result = parse_curl(done.stdout)
    check(result, url, expected_size)
    return result


def check(result: Fetch, url: str, expected_size: int) -> None:
    if result.code != 200 or result.size != expected_size:
        raise RuntimeError(
            f"{url}: HTTP {result.code}, {result.size} bytes, wanted 200 and {expected_size}"
        )


def fetch_concurrently(url: str, clients: int, expected_size: int) -> tuple[float, list[Fetch]]:
    """``clients`` curl processes at once; the wall time until the last is done."""
    started = time.monotonic()
    running = [
        subprocess.Popen(curl_argv(url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(clients)
    ]
    results = []
    for process in running:
        out, err = process.communicate(timeout=600)
        if process.returncode != 0:
            raise RuntimeError(f"curl {url} failed: exit {process.returncode} {err}")
        results.append(parse_curl(out))
    wall = time.monotonic() - started
    for result in results:
        check(result, url, expected_size)
    return wall, results


WRK_SCRIPT = """\
done = function(summary, latency, requests)
  io.write(string.format(
    "WRKJSON {\\"requests\\": %d, \\"bytes\\": %d, \\"duration_us\\": %d, " ..
    "\\"errors\\": %d, \\"p50_us\\": %d, \\"p99_us\\": %d}\\n",
    summary.requests, summary.bytes, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.status + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def wrk(url: str, threads: int, connections: int, seconds: int, script: Path) -> dict:
    done = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "60s",
         "-s", str(script), url],
        capture_output=True, text=True, timeout=seconds + 120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk {url} failed: {done.stderr}")
    match = re.search(r"^WRKJSON (.*)$", done.stdout, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no summary:\n{done.stdout}")
    summary = json.loads(match.group(1))
    seconds_taken = summary["duration_us"] / 1e6
    summary["requests_per_second"] = summary["requests"] / seconds_taken
    summary["bytes_per_second"] = summary["bytes"] / seconds_taken
    if summary["errors"]:
        raise RuntimeError(f"wrk {url}: {summary['errors']} errors\n{done.stdout}")
    return summary


@dataclass
class Answer:
    """One HTTP response read off a keep-alive connection."""

    status: int
    headers: dict
    body: bytes


class ResponseReader:
    """
    Reads HTTP/1.1 responses (Content-Length or chunked) from the bytes of
    one connection, as they arrive.
    """

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._head: Optional[tuple[int, dict]] = None
        self._body_start = 0

    def feed(self, data: bytes) -> Optional[Answer]:
        """Add ``data``; the response once it is complete, else None."""
        self.buffer += data
        if self._head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return None
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self._head = (status, headers)
            self._body_start = end + 4
        status, headers = self._head
        start = self._body_start
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = self._chunked(start)
            if body is None:
                return None
            body, end = body
        else:
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) - start < length:
                return None
            end = start + length
            body = bytes(self.buffer[start:end])
        del self.buffer[:end]
        self._head = None
        return Answer(status, headers, body)

    def _chunked(self, at: int) -> Optional[tuple[bytes, int]]:
        parts = []
        while True:
            line_end = self.buffer.find(b"\r\n", at)
            if line_end < 0:
                return None
            size = int(bytes(self.buffer[at:line_end]).split(b";")[0], 16)
            at = line_end + 2
            if size == 0:
                trailer_end = self.buffer.find(b"\r\n", at)
                if trailer_end < 0:
                    return None
                return b"".join(parts), trailer_end + 2
            if len(self.buffer) < at + size + 2:
                return None
            parts.append(bytes(self.buffer[at:at + size]))
            at += size + 2


def get_request(port: int, path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"User-Agent: pkgcache-bench\r\nAccept: */*\r\n\r\n").encode("ascii")


class KeepAliveClients:
    """
    ``count`` keep-alive connections to one port, opened one after the
    other, each answered once (a request for ``warm_path``) so that every
    one is accepted and idle before a burst; then :meth:`burst` sends one
    request on each of them, all at once, from one thread.
    """

    def __init__(self, port: int, count: int, warm_path: str) -> None:
        self.port = port
        self.sockets: list[socket.socket] = []
        self.readers: list[ResponseReader] = []
        try:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", port), timeout=60)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.sockets.append(sock)
                self.readers.append(ResponseReader())
                answer = self._blocking_get(len(self.sockets) - 1, warm_path)
                if answer.status != 200:
                    raise RuntimeError(f"warm-up GET {warm_path} on port {port}: HTTP {answer.status}")
        except BaseException:
            self.close()
            raise

    def _blocking_get(self, index: int, path: str) -> Answer:
        sock, reader = self.sockets[index], self.readers[index]
        sock.sendall(get_request(self.port, path))
        while True:
            data = sock.recv(1 << 18)
            if not data:
                raise RuntimeError(f"port {self.port} closed a keep-alive connection")
            answer = reader.feed(data)
            if answer is not None:
                return answer

    def burst(self, path: str, timeout: float = 300) -> tuple[list[float], list[Answer], float]:
        """
        One GET of ``path`` on every connection, all sent before any is read.
        Each request's latency (from its send to the last byte of its
        answer), the answers, and the wall time of the whole burst.
        """
        request = get_request(self.port, path)
        selector = selectors.DefaultSelector()
        sent = [0.0] * len(self.sockets)
        done = [0.0] * len(self.sockets)
        answers: list[Optional[Answer]] = [None] * len(self.sockets)
        try:
            for index, sock in enumerate(self.sockets):
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, index)
            started = time.monotonic()
            for index, sock in enumerate(self.sockets):
                # ~100 bytes into an idle socket's empty send buffer: all of it.
                if sock.send(request) != len(request):
                    raise RuntimeError("a burst request was not sent whole")
                sent[index] = time.monotonic()
            pending = len(self.sockets)
            deadline = started + timeout
            while pending:
                events = selector.select(max(0.0, deadline - time.monotonic()))
                if not events:
                    raise RuntimeError(f"burst on port {self.port}: {pending} answers missing "
                                       f"after {timeout:g}s")
                for key, _ in events:
                    index = key.data
                    data = self.sockets[index].recv(1 << 18)
                    if not data:
                        raise RuntimeError(f"port {self.port} closed a connection during a burst")
                    answer = self.readers[index].feed(data)
                    if answer is not None:
                        done[index] = time.monotonic()
                        answers[index] = answer
                        selector.unregister(self.sockets[index])
                        pending -= 1
            wall = max(done) - started
        finally:
            selector.close()
            for sock in self.sockets:
                sock.setblocking(True)
                sock.settimeout(60)
        for reader in self.readers:
            if reader.buffer:
                raise RuntimeError(f"port {self.port} sent more than one answer per request")
        return [d - s for s, d in zip(sent, done)], answers, wall  # type: ignore[return-value]

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile: ``share`` 0.99 is the p99."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1))]


def http_get(port: int, path: str) -> Answer:
    """One GET on a connection of its own (http.client)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
    finally:
        connection.close()


# -- the benchmark ----------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table."""

    section: str
    subject: str
    value: float
    unit: str
    ratio: Optional[float] = None
    ratio_to: str = ""
    target: str = ""
    met: Optional[bool] = None
    samples: list = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = Sizes.quick() if args.quick else Sizes.full()
        self.work = Path(args.workdir)
        self.processes = Processes(self.work)
        self.rows: list[Row] = []
        self.extra: dict = {}
        self.files = self.work / "files"
        self._pkgcache_count = 0

    # setup

    def make_files(self) -> None:
        self.files.mkdir()
        for name, size in (("big.bin", self.sizes.big), ("mid.bin", self.sizes.mid),
                           ("small.bin", self.sizes.small)):
            with open(self.files / name, "wb") as out:
                left = size
                while left:
                    chunk = os.urandom(min(left, 16 * MiB))
                    out.write(chunk)
                    left -= len(chunk)
        os.sync()

    def start_servers(self) -> None:
        self.origin_port, self.throttled_port = free_port(), free_port()
        servers = ORIGIN_SERVER.format(
            port=self.origin_port, dir=self.work / "origin", log="origin-access.log",
            files=self.files, limit="",
        ) + ORIGIN_SERVER.format(
            port=self.throttled_port, dir=self.work / "origin", log="throttled-access.log",
            files=self.files, limit=f"limit_rate {THROTTLE};",
        )
        self.origin = start_nginx(
            self.processes, self.work / "origin", servers, [self.origin_port, self.throttled_port]
        )
        self.proxy_port, self.proxy_throttled_port = free_port(), free_port()
        proxy_dir = self.work / "nginx-proxy"
        servers = PROXY_CACHE_PATH.format(dir=proxy_dir) + PROXY_SERVER.format(
            port=self.proxy_port, dir=proxy_dir, origin_port=self.origin_port, listen_options=""
        ) + PROXY_SERVER.format(
            port=self.proxy_throttled_port, dir=proxy_dir, origin_port=self.throttled_port,
            listen_options="",
        )
        self.proxy = start_nginx(
            self.processes, proxy_dir, servers, [self.proxy_port, self.proxy_throttled_port]
        )
        self.proxy_cache_dir = proxy_dir / "cache"

    def start_pkgcache(
        self, throttled: bool = False, options: tuple[str, ...] = (), listen_options: str = ""
    ) -> tuple[subprocess.Popen, int, Path]:
        """
        A fresh pkgcache, with an empty cache directory of its own; more
        ``options`` on its command line, ``listen_options`` (such as
        ``:backlog=1024``) after its ``--listen`` endpoint.
        """
        self._pkgcache_count += 1
        port = free_port()
        cache = self.work / f"pkgcache-{self._pkgcache_count}"
        origin = self.throttled_port if throttled else self.origin_port
        log = open(self.work / f"pkgcache-{self._pkgcache_count}.log", "wb")
        process = self.processes.start(
            [self.args.twist, "--log-format=text", "pkgcache",
             "--source", f"http://127.0.0.1:{origin}/",
             "--cache-dir", str(cache),
             # Its Cache-Status entries then say "pkgcache; ...", as checked.
             "--node-name", "pkgcache",
             "--listen", f"tcp:{port}:interface=127.0.0.1{listen_options}", *options],
            stdout=log, stderr=subprocess.STDOUT,
        )
        wait_for_port(port, process, "pkgcache")
        # A small miss and hit first, so that code loaded on first use (the
        # HTTP client, the disk threads) is not part of any measurement, as
        # it is not of nginx's, and the slow reader's RSS baseline has it.
        label = f"warmup-{self._pkgcache_count}"
        fetch(f"http://127.0.0.1:{port}/v/{label}/small.bin", self.sizes.small)
        self.wait_published(cache, label, "small.bin", self.sizes.small)
        fetch(f"http://127.0.0.1:{port}/v/{label}/small.bin", self.sizes.small)
        return process, port, cache

    def stop_pkgcache(self, process: subprocess.Popen, cache: Path) -> None:
        self.processes.stop(process)
        shutil.rmtree(cache, ignore_errors=True)

    # helpers

    def upstream_requests(self, label: str, throttled: bool = False) -> int:
        log = self.work / "origin" / ("throttled-access.log" if throttled else "origin-access.log")
        prefix = f"/v/{label}/"
        with open(log) as lines:
            return sum(1 for line in lines if line.startswith(prefix))

    def wait_published(self, cache: Path, label: str, name: str, size: int) -> float:
        """Wait until pkgcache has published ``/v/label/name``; seconds waited."""
        path = cache / "v" / label / name
        started = time.monotonic()
        deadline = started + 300
        while time.monotonic() < deadline:
            try:
                if path.stat().st_size == size:
                    return time.monotonic() - started
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"pkgcache did not publish {path}")

    def drop_published(self, cache: Path, label: str) -> None:
        shutil.rmtree(cache / "v" / label, ignore_errors=True)

    def purge_nginx_cache(self) -> None:
        """
        Delete the files of proxy_cache (misses only ever ask for new paths,
        so nothing needs them again): keeps the disk use of a run bounded.
        """
        for entry in self.proxy_cache_dir.glob("*"):
            shutil.rmtree(entry, ignore_errors=True)

    def settle(self) -> None:
        """Write back dirty pages, so one measurement's writes do not slow the next."""
        os.sync()
        time.sleep(0.2)

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        ratio = f"  {row.ratio:.2f}x {row.ratio_to}" if row.ratio is not None else ""
        verdict = "" if row.met is None else ("  target met" if row.met else "  TARGET MISSED")
        self.log(f"  {row.section} | {row.subject}: {format_value(row.value, row.unit)}{ratio}{verdict}")

    # scenarios

    def miss(self, throttled: bool) -> dict:
        """
        One file of ``big`` bytes downloaded by one client: straight from the
        origin, through a pkgcache miss, through a proxy_cache miss,
        alternating, ``repeats`` times each.  Also the hits, on the
        unthrottled run.
        """
        size = self.sizes.big
        kind = "throttled" if throttled else "loopback"
        section = f"{human(size)} miss, origin {'at ' + THROTTLE_LABEL if throttled else 'unthrottled'}"
        origin_port = self.throttled_port if throttled else self.origin_port
        proxy_port = self.proxy_throttled_port if throttled else self.proxy_port
        process, port, cache = self.start_pkgcache(throttled)
        times: dict[str, list[float]] = {"direct": [], "pkgcache": [], "nginx": []}
        publish_waits = []
        kept = {}
        try:
            repeats = self.sizes.throttled_miss_repeats if throttled else self.sizes.repeats
            for rep in range(repeats):
                order = ["direct", "pkgcache", "nginx"]
                order = order[rep % 3:] + order[:rep % 3]
                for subject in order:
                    label = f"{kind}-miss-{subject}-{rep}"
                    if subject == "direct":
                        url = f"http://127.0.0.1:{origin_port}/v/{label}/big.bin"
                    elif subject == "pkgcache":
                        url = f"http://127.0.0.1:{port}/v/{label}/big.bin"
                    else:
                        url = f"http://127.0.0.1:{proxy_port}/v/{label}/big.bin"
                    result = fetch(url, size)
                    if subject == "nginx" and result.cache_status != "MISS":
                        raise RuntimeError(f"nginx answered {url} with cache status {result.cache_status}")
                    times[subject].append(result.seconds)
                    if subject == "pkgcache":
                        publish_waits.append(self.wait_published(cache, label, "big.bin", size))
                        if rep == 0 and not throttled:
                            self.verify_published(cache / "v" / label / "big.bin")
                    if self.upstream_requests(label, throttled) != 1:
                        raise RuntimeError(f"{label}: {self.upstream_requests(label, throttled)} upstream requests")
                    self.log(f"  {kind} miss {subject} #{rep}: {result.seconds:.3f}s")
                    if rep == 0:
                        kept[subject] = label
                    else:
                        self.drop_published(cache, label)
                    self.settle()
            direct = statistics.median(times["direct"])
            pkg = statistics.median(times["pkgcache"])
            ngx = statistics.median(times["nginx"])
            self.add(Row(section, "direct from origin", direct, "s", samples=times["direct"],
                         ratio=1.0, ratio_to="of direct"))
            self.add(Row(section, "pkgcache miss", pkg, "s", samples=times["pkgcache"],
                         ratio=pkg / direct, ratio_to="of direct",
                         target=f"<= {MISS_TARGET}x direct", met=pkg / direct <= MISS_TARGET))
            self.add(Row(section, "nginx proxy_cache miss", ngx, "s", samples=times["nginx"],
                         ratio=ngx / direct, ratio_to="of direct"))
            self.add(Row(section, "pkgcache / nginx", pkg / ngx, "x"))
            self.extra[f"{kind}_miss_publish_wait_seconds"] = publish_waits
            if throttled:
                self.extra["throttled_direct_bytes_per_second"] = size / direct
            else:
                self.hits(port, kept)
        finally:
            self.stop_pkgcache(process, cache)
            self.purge_nginx_cache()
        return times

    def verify_published(self, path: Path) -> None:
        """The published file is the origin's, byte for byte (once per run)."""
        import filecmp

        if not filecmp.cmp(path, self.files / "big.bin", shallow=False):
            raise RuntimeError(f"{path} differs from the origin's file")
        self.log("  published file matches the origin byte for byte")

    def hits(self, pkgcache_port: int, kept: dict) -> None:
        size = self.sizes.big
        section = f"{human(size)} hit"
        urls = {
            "direct": f"http://127.0.0.1:{self.origin_port}/big.bin",
            "pkgcache": f"http://127.0.0.1:{pkgcache_port}/v/{kept['pkgcache']}/big.bin",
            "nginx": f"http://127.0.0.1:{self.proxy_port}/v/{kept['nginx']}/big.bin",
        }
        times: dict[str, list[float]] = {subject: [] for subject in urls}
        for rep in range(self.sizes.repeats):
            for subject, url in urls.items():
                result = fetch(url, size)
                if subject == "nginx" and result.cache_status != "HIT":
                    raise RuntimeError(f"nginx answered {url} with cache status {result.cache_status}")
                times[subject].append(result.seconds)
                self.log(f"  hit {subject} #{rep}: {result.seconds:.3f}s")
        if self.upstream_requests(kept["pkgcache"]) != 1:
            raise RuntimeError("a pkgcache hit went to the origin")
        direct = statistics.median(times["direct"])
        pkg = statistics.median(times["pkgcache"])
        ngx = statistics.median(times["nginx"])
        self.add(Row(section, "direct from origin", direct, "s", samples=times["direct"],
                     ratio=1.0, ratio_to="of direct"))
        self.add(Row(section, "pkgcache hit", pkg, "s", samples=times["pkgcache"],
                     ratio=pkg / direct, ratio_to="of direct"))
        self.add(Row(section, "nginx proxy_cache hit", ngx, "s", samples=times["nginx"],
                     ratio=ngx / direct, ratio_to="of direct"))
        self.add(Row(section, "pkgcache / nginx", pkg / ngx, "x"))

    def coalesced(self, throttled: bool) -> None:
        """
        ``clients`` clients at once on one uncached file of ``mid`` bytes,
        against one client on another uncached file of the same size.
        """
        size, clients = self.sizes.mid, self.sizes.clients
        kind = "throttled" if throttled else "loopback"
        section = (f"{clients} clients on one uncached {human(size)} file, origin "
                   f"{'at ' + THROTTLE_LABEL if throttled else 'unthrottled'}")
        origin_port = self.throttled_port if throttled else self.origin_port
        proxy_port = self.proxy_throttled_port if throttled else self.proxy_port
        process, port, cache = self.start_pkgcache(throttled)
        bases = {
            "direct": f"http://127.0.0.1:{origin_port}",
            "pkgcache": f"http://127.0.0.1:{port}",
            "nginx": f"http://127.0.0.1:{proxy_port}",
        }
        one: dict[str, list[float]] = {subject: [] for subject in bases}
        many: dict[str, list[float]] = {subject: [] for subject in bases}
        upstream: dict[str, list[int]] = {subject: [] for subject in bases}
        try:
            for rep in range(self.sizes.repeats):
                for subject, base in bases.items():
                    label = f"{kind}-one-{subject}-{rep}"
                    wall, _ = fetch_concurrently(f"{base}/v/{label}/mid.bin", 1, size)
                    one[subject].append(wall)
                    if subject == "pkgcache":
                        self.wait_published(cache, label, "mid.bin", size)
                        self.drop_published(cache, label)
                    self.settle()
                    label = f"{kind}-many-{subject}-{rep}"
                    wall, results = fetch_concurrently(f"{base}/v/{label}/mid.bin", clients, size)
                    many[subject].append(wall)
                    if subject == "pkgcache":
                        self.wait_published(cache, label, "mid.bin", size)
                        self.drop_published(cache, label)
                    time.sleep(0.1)  # the origin logs a request once it is done
                    upstream[subject].append(self.upstream_requests(label, throttled))
                    self.log(f"  {kind} coalesced {subject} #{rep}: 1 client {one[subject][-1]:.3f}s, "
                             f"{clients} clients {wall:.3f}s, {upstream[subject][-1]} upstream requests")
                    self.settle()
            for subject, name in (("direct", "direct from origin (no cache)"),
                                  ("pkgcache", "pkgcache"), ("nginx", "nginx proxy_cache")):
                single = statistics.median(one[subject])
                crowd = statistics.median(many[subject])
                target = met = None
                if subject == "pkgcache":
                    target = f"<= {COALESCED_TARGET}x one client"
                    met = crowd / single <= COALESCED_TARGET
                self.add(Row(section, f"{name}: 1 client", single, "s", samples=one[subject]))
                self.add(Row(section, f"{name}: {clients} clients", crowd, "s",
                             samples=many[subject], ratio=crowd / single,
                             ratio_to="of 1 client", target=target or "", met=met))
                self.add(Row(section, f"{name}: upstream requests for {clients} clients",
                             max(upstream[subject]), "requests", samples=upstream[subject],
                             target="1" if subject != "direct" else "",
                             met=(max(upstream[subject]) == 1) if subject != "direct" else None))
            self.add(Row(section, f"pkgcache / nginx, {clients} clients",
                         statistics.median(many["pkgcache"]) / statistics.median(many["nginx"]), "x"))
        finally:
            self.stop_pkgcache(process, cache)
            self.purge_nginx_cache()

    def slow_reader(self) -> None:
        """
        One client at 1 MB/s and one at full speed on the same uncached
        file of ``big`` bytes.  The slow one starts first (so it is the one
        whose request began the download).  Peak RSS growth is taken until
        the fast client is done and the file is published; then the slow
        client is killed (it would take 18 minutes on a 1 GiB file).
        """
        size = self.sizes.big
        section = f"slow reader: {human(size)} miss, one client at 1 MB/s + one at full speed"
        process, port, cache = self.start_pkgcache()
        try:
            fetch(f"http://127.0.0.1:{self.proxy_port}/v/warmup/small.bin", self.sizes.small)
            results = {}
            for subject, base, pid in (
                ("pkgcache", f"http://127.0.0.1:{port}", process.pid),
                ("nginx", f"http://127.0.0.1:{self.proxy_port}", nginx_worker(self.proxy)),
            ):
                label = f"slow-{subject}"
                url = f"{base}/v/{label}/big.bin"
                time.sleep(0.5)
                watch = RssWatch(pid)
                slow = self.processes.start(curl_argv(url, limit_rate="1M"),
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.2)
                fast = fetch(url, size)
                if subject == "pkgcache":
                    published_after = self.wait_published(cache, label, "big.bin", size)
                else:
                    published_after = 0.0
                rss = watch.finish()
                slow_alive = slow.poll() is None
                self.processes.stop(slow)
                rss.update(fast_client_seconds=fast.seconds, slow_client_alive=slow_alive,
                           publish_wait_seconds=published_after,
                           upstream_requests=self.upstream_requests(label))
                results[subject] = rss
                self.log(f"  slow reader {subject}: fast client {fast.seconds:.3f}s, "
                         f"RSS {human(rss['baseline_bytes'])} -> {human(rss['peak_bytes'])}, "
                         f"slow client still reading: {slow_alive}, "
                         f"{rss['upstream_requests']} upstream request(s)")
                self.settle()
            self.extra["slow_reader"] = results
            pkg, ngx = results["pkgcache"], results["nginx"]
            self.add(Row(section, "pkgcache peak RSS growth", pkg["growth_bytes"], "bytes",
                         target=f"< {human(RSS_GROWTH_LIMIT)}",
                         met=pkg["growth_bytes"] < RSS_GROWTH_LIMIT))
            self.add(Row(section, "nginx proxy_cache worker peak RSS growth",
                         ngx["growth_bytes"], "bytes"))
            self.add(Row(section, "pkgcache: fast client's time", pkg["fast_client_seconds"], "s"))
            self.add(Row(section, "nginx proxy_cache: fast client's time",
                         ngx["fast_client_seconds"], "s"))
            self.add(Row(section, "pkgcache / nginx, fast client's time",
                         pkg["fast_client_seconds"] / ngx["fast_client_seconds"], "x"))
        finally:
            self.stop_pkgcache(process, cache)
            self.purge_nginx_cache()

    def wrk_hits(self) -> None:
        """wrk on cached files: 4 KiB hits per second, and a large file's throughput."""
        script = self.work / "summary.lua"
        script.write_text(WRK_SCRIPT)
        process, port, cache = self.start_pkgcache()
        seconds = self.sizes.wrk_seconds
        try:
            for name, size, connections, measure, section in (
                ("small.bin", self.sizes.small, 32, "requests_per_second",
                 f"{human(self.sizes.small)} hits (wrk -t2 -c32 -d{seconds}s)"),
                ("mid.bin", self.sizes.mid, 8, "bytes_per_second",
                 f"{human(self.sizes.mid)} hits, throughput (wrk -t2 -c8 -d{seconds}s)"),
            ):
                label = "wrk-" + name.split(".")[0]
                urls = {
                    "direct": f"http://127.0.0.1:{self.origin_port}/{name}",
                    "pkgcache": f"http://127.0.0.1:{port}/v/{label}/{name}",
                    "nginx": f"http://127.0.0.1:{self.proxy_port}/v/{label}/{name}",
                }
                fetch(urls["pkgcache"], size)
                self.wait_published(cache, label, name, size)
                fetch(urls["nginx"], size)
                if fetch(urls["nginx"], size).cache_status != "HIT":
                    raise RuntimeError("nginx did not cache the wrk file")
                self.settle()
                found = {}
                for subject, url in urls.items():
                    found[subject] = wrk(url, 2, connections, seconds, script)
                    self.log(f"  wrk {name} {subject}: {found[subject]['requests_per_second']:.0f} req/s, "
                             f"{human(found[subject]['bytes_per_second'])}/s")
                if self.upstream_requests(label) != 2:
                    raise RuntimeError("wrk hits went to the origin")
                unit = "req/s" if measure == "requests_per_second" else "B/s"
                direct = found["direct"][measure]
                for subject, label in (("direct", "nginx origin, direct"),
                                       ("pkgcache", "pkgcache hit"),
                                       ("nginx", "nginx proxy_cache hit")):
                    value = found[subject][measure]
                    self.add(Row(section, label, value, unit, ratio=value / direct,
                                 ratio_to="of direct", samples=[found[subject]]))
                self.add(Row(section, "pkgcache / nginx proxy_cache",
                             found["pkgcache"][measure] / found["nginx"][measure], "x"))
        finally:
            self.stop_pkgcache(process, cache)
            self.purge_nginx_cache()

    # freshness

    def make_freshness_files(self) -> None:
        """
        On the origin (once): ``INDEX_PATH``, a Release-like text of about
        ``INDEX_SIZE`` bytes, and 4 KiB files at the two volatile paths and
        the immutable one.  nginx sends ETag and Last-Modified for them and
        answers conditional GETs with 304.
        """
        index = self.files / INDEX_PATH
        if index.exists():
            return
        index.parent.mkdir(parents=True, exist_ok=True)
        lines = ["Origin: pkgcache-bench", "Label: pkgcache-bench", "Suite: stable",
                 "Codename: bench", "Date: Thu, 01 Jan 2026 00:00:00 UTC",
                 "Architectures: amd64", "Components: main", "SHA256:"]
        length = sum(len(line) + 1 for line in lines)
        number = 0
        while length < INDEX_SIZE:
            line = (f" {os.urandom(32).hex()} {int.from_bytes(os.urandom(3), 'big'):8d} "
                    f"main/binary-amd64/Packages-{number:05d}.xz")
            lines.append(line)
            length += len(line) + 1
            number += 1
        index.write_text("\n".join(lines) + "\n")
        small = self.sizes.small
        for path in (VOLATILE_INDEX_PATH, IMMUTABLE_PATH):
            target = self.files / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(os.urandom(small))
        page = self.files / VOLATILE_PAGE_PATH / "index.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        head = b"<!DOCTYPE html>\n<html><body>\n"
        link = b'<a href="../../pool/foo-1.0.tar.gz#sha256=%s">foo-1.0.tar.gz</a><br>\n'
        text = head
        while len(text) < small:
            text += link % os.urandom(32).hex().encode()
        page.write_bytes(text[:small - len(b"</body></html>\n")] + b"</body></html>\n")
        os.sync()

    def origin_log(self, path: str) -> list[str]:
        """The origin's status for each request of exactly ``path`` so far."""
        with open(self.work / "origin" / "origin-access.log") as lines:
            return [fields[1] for fields in (line.split() for line in lines)
                    if fields and fields[0] == path]

    def start_fresh_proxy(self, max_age: int) -> tuple[subprocess.Popen, int]:
        """nginx proxy_cache revalidating after ``max_age`` s, stale while updating."""
        port = free_port()
        directory = self.work / f"nginx-fresh-{port}"
        servers = FRESH_PROXY_SERVER.format(
            port=port, dir=directory, origin_port=self.origin_port, max_age=max_age
        )
        return start_nginx(self.processes, directory, servers, [port]), port

    def stale_burst(self) -> None:
        """
        ``BURST_CLIENTS`` keep-alive clients ask at the same moment for one
        index that is cached but stale: straight from the origin (no cache,
        every request goes there), through pkgcache with ``--volatile-max-age
        BURST_MAX_AGE`` and through nginx proxy_cache with
        ``proxy_cache_valid 200`` the same, ``proxy_cache_revalidate``, the
        lock and ``proxy_cache_use_stale updating``.  Each burst is one
        request on each connection, all sent before any answer is read.
        Counted: the origin's requests for the index during each burst.

        Each stale burst is followed at once, on the same connections, by a
        burst of fresh hits (no revalidation), to tell the cost of the shared
        revalidation from that of serving 200 copies of the index.
        """
        clients, max_age = BURST_CLIENTS, BURST_MAX_AGE
        self.make_freshness_files()
        expected = (self.files / INDEX_PATH).read_bytes()
        size = len(expected)
        section = (f"{clients} keep-alive clients at once on one stale {human(size)} index "
                   f"(max-age {max_age} s, {self.sizes.repeats} bursts)")
        # 3 x 200 client sockets here, 200 more in each server.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 8 * clients + 1024
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY
                                                        else min(want, hard), hard))
        process, port, cache = self.start_pkgcache(
            options=("--volatile-max-age", str(max_age)), listen_options=":backlog=1024"
        )
        pkgcache_log = self.work / f"pkgcache-{self._pkgcache_count}.log"
        proxy, proxy_port = self.start_fresh_proxy(max_age)
        ports = {"direct": self.origin_port, "pkgcache": port, "nginx": proxy_port}
        paths = {subject: f"/v/burst-{subject}/{INDEX_PATH}" for subject in ports}
        connections: dict[str, KeepAliveClients] = {}
        bursts: dict[str, list[dict]] = {subject: [] for subject in ports}
        try:
            # One GET each caches the index (a miss).
            checked = {}
            for subject, status_header, wanted in (("pkgcache", "cache-status", "fwd=miss"),
                                                   ("nginx", "x-cache-status", "MISS")):
                answer = http_get(ports[subject], paths[subject])
                if answer.status != 200 or answer.body != expected:
                    raise RuntimeError(f"{subject} {paths[subject]}: HTTP {answer.status}, "
                                       f"{len(answer.body)} bytes")
                if wanted not in answer.headers.get(status_header, ""):
                    raise RuntimeError(f"{subject}: first GET of the index answered "
                                       f"{status_header}: {answer.headers.get(status_header)}")
                checked[subject] = time.monotonic()
            for subject, subject_port in ports.items():
                connections[subject] = KeepAliveClients(
                    subject_port, clients, f"/v/burst-{subject}-conn/small.bin"
                )
            self.log(f"  {clients} keep-alive connections open to each of {', '.join(ports)}")
            for rep in range(self.sizes.repeats):
                order = list(ports)
                order = order[rep % 3:] + order[:rep % 3]
                for subject in order:
                    if subject != "direct":
                        # Stale: past max-age since its last check, by a margin
                        # (nginx counts expiry in whole seconds: up to 1 s more).
                        time.sleep(max(0.0, checked[subject] + max_age + 1.5 - time.monotonic()))
                    seen = len(self.origin_log(paths[subject]))
                    outcomes_before = self.pkgcache_outcomes(pkgcache_log, paths["pkgcache"])
                    latencies, answers, wall = connections[subject].burst(paths[subject])
                    checked[subject] = time.monotonic()
                    outcomes_after = self.pkgcache_outcomes(pkgcache_log, paths["pkgcache"])
                    fresh = None
                    if subject != "direct":
                        fresh = self.fresh_burst(connections[subject], paths[subject],
                                                 subject, expected)
                    full = sum(1 for answer in answers
                               if answer.status == 200 and answer.body == expected)
                    status_header = "x-cache-status" if subject == "nginx" else "cache-status"
                    statuses: dict[str, int] = {}
                    for answer in answers:
                        value = answer.headers.get(status_header, "-")
                        statuses[value] = statuses.get(value, 0) + 1
                    time.sleep(0.3)  # the origin logs a request once it is done
                    upstream = self.origin_log(paths[subject])[seen:]
                    result = {
                        "p50_seconds": statistics.median(latencies),
                        "p99_seconds": percentile(latencies, 0.99),
                        "max_seconds": max(latencies),
                        "wall_seconds": wall,
                        "full_answers": full,
                        "upstream_requests": len(upstream),
                        "upstream_statuses": upstream,
                        "cache_status": statuses,
                    }
                    if fresh is not None:
                        result["fresh_hits"] = fresh
                    if subject == "pkgcache":
                        result["pkgcache_outcomes"] = {
                            k: outcomes_after[k] - outcomes_before.get(k, 0) for k in outcomes_after
                            if outcomes_after[k] - outcomes_before.get(k, 0)
                        }
                    bursts[subject].append(result)
                    self.log(f"  burst {subject} #{rep}: p50 {result['p50_seconds']:.3f}s, "
                             f"p99 {result['p99_seconds']:.3f}s, wall {wall:.3f}s, "
                             f"{full}/{clients} full 200s, {len(upstream)} upstream request(s) "
                             f"{upstream if len(upstream) < 10 else ''}, "
                             f"{status_header}: {statuses}"
                             + (f", pkgcache log: {result['pkgcache_outcomes']}"
                                if subject == "pkgcache" else ""))
                    if fresh is not None:
                        self.log(f"  fresh-hit burst {subject} #{rep}: p50 {fresh['p50_seconds']:.3f}s, "
                                 f"p99 {fresh['p99_seconds']:.3f}s, wall {fresh['wall_seconds']:.3f}s")
                    if subject == "pkgcache" and not any("fwd=stale" in value for value in statuses):
                        raise RuntimeError(f"pkgcache burst #{rep} did not find the index stale: "
                                           f"{statuses}")
                    if subject == "nginx" and not set(statuses) & {"REVALIDATED", "UPDATING",
                                                                   "EXPIRED", "STALE"}:
                        raise RuntimeError(f"nginx burst #{rep} did not find the index stale: "
                                           f"{statuses}")
                    if subject == "pkgcache" and len(upstream) > 1:
                        self.show_pkgcache_log(pkgcache_log, paths["pkgcache"])
            self.extra["stale_burst"] = {"clients": clients, "max_age": max_age,
                                         "index_bytes": size, "bursts": bursts}
            total = clients * self.sizes.repeats
            p50 = {s: statistics.median(b["p50_seconds"] for b in bursts[s]) for s in ports}
            p99 = {s: statistics.median(b["p99_seconds"] for b in bursts[s]) for s in ports}
            for subject, name in (("direct", "direct from origin (no cache)"),
                                  ("pkgcache", "pkgcache"), ("nginx", "nginx proxy_cache")):
                upstream = [b["upstream_requests"] for b in bursts[subject]]
                self.add(Row(section, f"{name}: median latency", p50[subject], "s",
                             samples=[b["p50_seconds"] for b in bursts[subject]],
                             ratio=p50[subject] / p50["direct"], ratio_to="of direct"))
                self.add(Row(section, f"{name}: p99 latency", p99[subject], "s",
                             samples=[b["p99_seconds"] for b in bursts[subject]],
                             ratio=p99[subject] / p99["direct"], ratio_to="of direct"))
                self.add(Row(section, f"{name}: upstream requests per burst", max(upstream),
                             "requests", samples=upstream,
                             target="1" if subject != "direct" else "",
                             met=(max(upstream) == 1) if subject != "direct" else None))
                full = sum(b["full_answers"] for b in bursts[subject])
                self.add(Row(section, f"{name}: answers 200 with the full body", full,
                             "requests", target=f"{total}", met=full == total))
                if subject != "direct":
                    fresh_p50 = [b["fresh_hits"]["p50_seconds"] for b in bursts[subject]]
                    fresh_p99 = [b["fresh_hits"]["p99_seconds"] for b in bursts[subject]]
                    self.add(Row(section, f"{name}: fresh-hit burst, median latency",
                                 statistics.median(fresh_p50), "s", samples=fresh_p50,
                                 ratio=statistics.median(fresh_p50) / p50["direct"],
                                 ratio_to="of direct"))
                    self.add(Row(section, f"{name}: fresh-hit burst, p99 latency",
                                 statistics.median(fresh_p99), "s", samples=fresh_p99,
                                 ratio=statistics.median(fresh_p99) / p99["direct"],
                                 ratio_to="of direct"))
                    ratios = [b["p50_seconds"] / b["fresh_hits"]["p50_seconds"]
                              for b in bursts[subject]]
                    self.add(Row(section, f"{name}: stale / fresh-hit burst, median latency",
                                 statistics.median(ratios), "x", samples=ratios))
            self.add(Row(section, "pkgcache / nginx, median latency",
                         p50["pkgcache"] / p50["nginx"], "x"))
            self.add(Row(section, "pkgcache / nginx, p99 latency",
                         p99["pkgcache"] / p99["nginx"], "x"))
            self.add(Row(section, "pkgcache / nginx, fresh-hit burst, median latency",
                         statistics.median(b["fresh_hits"]["p50_seconds"] for b in bursts["pkgcache"])
                         / statistics.median(b["fresh_hits"]["p50_seconds"] for b in bursts["nginx"]),
                         "x"))
        finally:
            for clients_of in connections.values():
                clients_of.close()
            self.processes.stop(proxy)
            self.stop_pkgcache(process, cache)

    def fresh_burst(self, clients: KeepAliveClients, path: str, subject: str,
                    expected: bytes) -> dict:
        """A burst right after a stale one: every answer must be a fresh hit."""
        latencies, answers, wall = clients.burst(path)
        for answer in answers:
            status = answer.headers.get("x-cache-status" if subject == "nginx" else "cache-status", "")
            hit = status == "HIT" if subject == "nginx" else status.startswith("pkgcache; hit; ttl=")
            if answer.status != 200 or answer.body != expected or not hit:
                raise RuntimeError(f"{subject}: the burst after the stale one was not all fresh "
                                   f"hits: HTTP {answer.status}, {len(answer.body)} bytes, "
                                   f"cache status {status!r} (BURST_MAX_AGE too short?)")
        return {"p50_seconds": statistics.median(latencies),
                "p99_seconds": percentile(latencies, 0.99), "wall_seconds": wall}

    def pkgcache_outcomes(self, log: Path, path: str) -> dict[str, int]:
        """How many of pkgcache's requests for ``path`` had each outcome so far."""
        found: dict[str, int] = {}
        marker = f" GET {path} "
        with open(log, errors="replace") as lines:
            for line in lines:
                at = line.find(marker)
                if at >= 0:
                    outcome = line[at + len(marker):].split(" ", 1)[0]
                    found[outcome] = found.get(outcome, 0) + 1
        return found

    def show_pkgcache_log(self, log: Path, path: str) -> None:
        """Print pkgcache's log lines about ``path`` that are not plain answers."""
        marker = f" GET {path} "
        with open(log, errors="replace") as lines:
            for line in lines:
                if path in line and marker not in line:
                    self.log(f"    pkgcache log: {line.rstrip()}")

    def volatile_hits(self) -> None:
        """
        wrk on cached 4 KiB files through one pkgcache with a long max-age:
        an immutable file, and two volatile ones kept fresh (a Debian index
        under dists/, and a directory URL as a PyPI project page), in turn,
        ``2 * repeats`` times, each run half as long as the other wrk step's.
        Each volatile hit is checked first to be answered as a fresh hit
        (``Cache-Status: pkgcache; hit; ttl=``), the immutable one as a plain
        hit, before and after; and none of the runs may reach the origin.
        """
        self.make_freshness_files()
        script = self.work / "summary.lua"
        script.write_text(WRK_SCRIPT)
        # Twice as many runs, half as long, as the other wrk step: the ratio
        # is taken run by run, and more pairs give a steadier median.
        seconds = max(3, self.sizes.wrk_seconds // 2)
        repeats = 2 * self.sizes.repeats
        connections = FRESH_HIT_CONNECTIONS
        small = self.sizes.small
        section = (f"fresh volatile against immutable {human(small)} hits, pkgcache "
                   f"(wrk -t2 -c{connections} -d{seconds}s, {repeats} runs each, in turn)")
        process, port, cache = self.start_pkgcache(
            options=("--volatile-max-age", "86400"), listen_options=":backlog=1024"
        )
        label = "fresh-hits"
        paths = {
            "immutable": f"/v/{label}/{IMMUTABLE_PATH}",
            "dists": f"/v/{label}/{VOLATILE_INDEX_PATH}",
            "simple": f"/v/{label}/{VOLATILE_PAGE_PATH}",
        }
        wanted = {"immutable": "pkgcache; hit", "dists": "pkgcache; hit; ttl=",
                  "simple": "pkgcache; hit; ttl="}
        try:
            statuses = {}
            for subject, path in paths.items():
                answer = http_get(port, path)
                if answer.status != 200 or len(answer.body) != small:
                    raise RuntimeError(f"{path}: HTTP {answer.status}, {len(answer.body)} bytes")
                deadline = time.monotonic() + 30
                while True:
                    answer = http_get(port, path)
                    status = answer.headers.get("cache-status", "")
                    if answer.status == 200 and len(answer.body) == small and (
                        status == wanted[subject] if subject == "immutable"
                        else status.startswith(wanted[subject])
                    ):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{path} is not answered as a hit: "
                                           f"HTTP {answer.status}, Cache-Status: {status}")
                    time.sleep(0.05)
                statuses[subject] = status
                self.log(f"  {path}: Cache-Status: {status}")
            self.settle()
            rates: dict[str, list[float]] = {subject: [] for subject in paths}
            summaries: dict[str, list[dict]] = {subject: [] for subject in paths}
            for rep in range(repeats):
                order = list(paths)
                order = order[rep % 3:] + order[:rep % 3]
                for subject in order:
                    summary = wrk(f"http://127.0.0.1:{port}{paths[subject]}", 2, connections,
                                  seconds, script)
                    rates[subject].append(summary["requests_per_second"])
                    summaries[subject].append(summary)
                    self.log(f"  wrk {subject} #{rep}: {summary['requests_per_second']:.0f} req/s, "
                             f"p50 {summary['p50_us'] / 1000:.1f} ms, p99 {summary['p99_us'] / 1000:.1f} ms")
                    self.settle()
            if len(self.origin_log_prefix(f"/v/{label}/")) != len(paths):
                raise RuntimeError(f"fresh hits went to the origin: "
                                   f"{len(self.origin_log_prefix(f'/v/{label}/'))} requests")
            for subject, path in paths.items():
                status = http_get(port, path).headers.get("cache-status", "")
                if not status.startswith(wanted[subject]):
                    raise RuntimeError(f"{path} after wrk: Cache-Status: {status}")
            self.extra["volatile_hits"] = {"cache_status": statuses, "wrk": summaries}
            immutable = statistics.median(rates["immutable"])
            self.add(Row(section, f"immutable hit ({IMMUTABLE_PATH})", immutable, "req/s",
                         samples=rates["immutable"], ratio=1.0, ratio_to="of immutable"))
            for subject, name in (("dists", f"fresh volatile hit, Debian index ({VOLATILE_INDEX_PATH})"),
                                  ("simple", f"fresh volatile hit, directory URL ({VOLATILE_PAGE_PATH})")):
                value = statistics.median(rates[subject])
                self.add(Row(section, name, value, "req/s", samples=rates[subject],
                             ratio=value / immutable, ratio_to="of immutable"))
            for subject, name in (("dists", VOLATILE_INDEX_PATH), ("simple", VOLATILE_PAGE_PATH)):
                # Each run against the immutable run next to it.
                ratios = [v / i for v, i in zip(rates[subject], rates["immutable"])]
                value = statistics.median(ratios)
                self.add(Row(section, f"volatile / immutable, {name}, run by run", value, "x",
                             samples=ratios, target=f">= {FRESH_HIT_TARGET}x (1.0 within noise)",
                             met=value >= FRESH_HIT_TARGET))
        finally:
            self.stop_pkgcache(process, cache)

    def origin_log_prefix(self, prefix: str) -> list[str]:
        with open(self.work / "origin" / "origin-access.log") as lines:
            return [line for line in lines if line.startswith(prefix)]

    def profile(self) -> None:
        """
        An extra 1 GiB miss (not timed) with py-spy recording pkgcache,
        written to the results directory.
        """
        py_spy = shutil.which("py-spy", path=str(Path(self.args.twist).parent)) or shutil.which("py-spy")
        if py_spy is None:
            self.log("  py-spy not found: no profile")
            return
        process, port, cache = self.start_pkgcache()
        results = Path(self.args.results)
        results.mkdir(parents=True, exist_ok=True)
        try:
            for fmt, suffix in (("flamegraph", "svg"), ("raw", "txt")):
                out = results / f"profile-miss.{suffix}"
                label = f"profile-{fmt}"
                recorder = self.processes.start(
                    [py_spy, "record", "--pid", str(process.pid), "--rate", "250",
                     "--format", fmt, "-o", str(out)],
                    stdout=subprocess.DEVNULL, stderr=open(self.work / "py-spy.log", "ab"),
                )
                time.sleep(1.0)
                result = fetch(f"http://127.0.0.1:{port}/v/{label}/big.bin", self.sizes.big)
                self.wait_published(cache, label, "big.bin", self.sizes.big)
                self.drop_published(cache, label)
                recorder.send_signal(signal.SIGINT)
                try:
                    recorder.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
                self.processes.stop(recorder)
                self.log(f"  profiled miss ({fmt}): {result.seconds:.3f}s -> {out}")
        finally:
            self.stop_pkgcache(process, cache)

    # all of it

    def run(self) -> None:
        started = time.monotonic()
        self.log(f"work directory {self.work}; {'quick' if self.args.quick else 'full'} run")
        self.log("generating files")
        self.make_files()
        self.start_servers()
        self.log(f"origin on {self.origin_port} (throttled: {self.throttled_port}), "
                 f"nginx proxy_cache on {self.proxy_port} ({self.proxy_throttled_port})")
        steps: list[tuple[str, Callable[[], object]]] = [
            ("miss and hit, origin unthrottled", lambda: self.miss(throttled=False)),
            (f"miss, origin at {THROTTLE_LABEL}", lambda: self.miss(throttled=True)),
            ("coalesced, origin unthrottled", lambda: self.coalesced(throttled=False)),
            (f"coalesced, origin at {THROTTLE_LABEL}", lambda: self.coalesced(throttled=True)),
            ("slow reader", self.slow_reader),
            ("wrk hits", self.wrk_hits),
            (f"freshness: {BURST_CLIENTS} clients at once on a stale index", self.stale_burst),
            ("freshness: fresh volatile hits against immutable hits", self.volatile_hits),
        ]
        if self.args.profile:
            steps.append(("py-spy profile of a miss", self.profile))
        steps.append(("speed: pkgcache --workers 1 and 2 against nginx with 2 workers",
                      lambda: speed.Speed(self).run()))
        steps.append(("scale: nodes behind nginx against one node, origin downloads with --peer",
                      lambda: scale_step.Scale(self).run()))
        for name, step in steps:
            if self.args.only and not any(word in name for word in self.args.only):
                continue
            self.log(name)
            step()
        self.extra["total_seconds"] = time.monotonic() - started

    def report(self) -> dict:
        print()
        print(table(self.rows))
        report = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "quick": self.args.quick,
            "sizes": self.sizes.__dict__,
            "machine": machine(self.args.twist),
            "rows": [row.__dict__ for row in self.rows],
            "extra": self.extra,
        }
        results = Path(self.args.results)
        results.mkdir(parents=True, exist_ok=True)
        out = results / f"{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if self.args.quick else ''}.json"
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nresults written to {out}")
        return report


# -- reporting ----------------------------------------------------------------------


def human(size: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size:.0f} B"


def format_value(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "bytes":
        return human(value)
    if unit == "B/s":
        return f"{human(value)}/s"
    if unit == "req/s":
        return f"{value:.0f} req/s"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "requests":
        return f"{value:.0f}"
    return f"{value} {unit}"


def table(rows: list[Row]) -> str:
    lines = []
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            lines.append(f"\n## {section}\n")
            lines.append("| measurement | value | range | ratio | target |")
            lines.append("| --- | ---: | ---: | ---: | --- |")
        ratio = f"{row.ratio:.2f}x {row.ratio_to}" if row.ratio is not None else ""
        target = row.target
        if row.met is not None:
            target += " — **met**" if row.met else " — **missed**"
        spread = ""
        numbers = [sample for sample in row.samples if isinstance(sample, (int, float))]
        if len(numbers) > 1 and row.unit == "s":
            spread = f"{min(numbers):.3f}–{max(numbers):.3f}"
        elif len(numbers) > 1 and row.unit == "req/s":
            spread = f"{min(numbers):.0f}–{max(numbers):.0f}"
        elif len(numbers) > 1 and row.unit == "x":
            spread = f"{min(numbers):.2f}–{max(numbers):.2f}"
        lines.append(f"| {row.subject} | {format_value(row.value, row.unit)} | {spread} "
                     f"| {ratio} | {target} |")
    return "\n".join(lines)


def machine(twist: str) -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    venv_python = str(Path(twist).parent / "python")
    versions = subprocess.run(
        [venv_python, "-c",
         "import sys, twisted, pkgcache; print(sys.version.split()[0], twisted.__version__, "
         "pkgcache.__version__)"],
        capture_output=True, text=True,
    ).stdout.split()
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    with open("/proc/meminfo") as meminfo:
        mem_kib = int(meminfo.readline().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": human(mem_kib * 1024),
        "kernel": platform.release(),
        "python": versions[0] if versions else "?",
        "twisted": versions[1] if len(versions) > 1 else "?",
        "pkgcache": versions[2] if len(versions) > 2 else "?",
        "nginx": nginx.split("/", 1)[-1],
        "wrk": wrk_version[0].split()[1] if wrk_version else "?",
        "curl": curl.split()[1] if curl else "?",
    }


def main() -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small files, one repetition, short wrk runs: a smoke run")
    parser.add_argument("--workdir", required=True,
                        help="an empty directory for files, caches and logs (removed at the end)")
    parser.add_argument("--twist", required=True, help="the twist of a venv with pkgcache installed")
    parser.add_argument("--results", default=str(here / "results"),
                        help="where to write the JSON results [default: bench/results]")
    parser.add_argument("--profile", action="store_true",
                        help="also record a py-spy profile of a miss (py-spy in the venv)")
    parser.add_argument("--only", action="append", default=[],
                        help="run only the steps whose name contains this word (repeatable): "
                             "miss, coalesced, slow, wrk, freshness, profile, speed, scale")
    parser.add_argument("--keep-workdir", action="store_true", help="for debugging")
    args = parser.parse_args()
    for tool in ("nginx", "wrk", "curl"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (bench/run installs it)")

    bench = Bench(args)
    work = Path(args.workdir)

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    atexit.register(bench.processes.stop_all)
    try:
        bench.run()
        bench.report()
    finally:
        bench.processes.stop_all()
        if not args.keep_workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    # bench/speed.py and bench/scale.py import this module as ``bench``: let it be this one.
    sys.modules.setdefault("bench", sys.modules["__main__"])
    import scale as scale_step  # (bench.human has a local named scale)
    import speed

    sys.exit(main())
