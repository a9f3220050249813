"""
``twist pkgcache --workers N`` as users run it: the installed twist, real
HTTP clients and a real upstream server on 127.0.0.1, worker processes
killed and restarted; then the pieces that need no processes (option
values, summing metrics, the restart policy).

Every process is started in a session of its own and the whole session is
killed at teardown, so that no worker outlives a failing test; every wait
is for an event (a log line, a count) with a deadline.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Optional

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from pkgcache import workers
from pkgcache.accesslog import whole_lines
from pkgcache.service import PackageCacheService
from pkgcache.tap import Options, makeService
from tests.clients import open_raw, within
from tests.conftest import wait_for as wait_for_twisted
from tests.origin import Gate
from tests.test_socket_activation import (  # noqa: F401 - processes and upstream are fixtures
    SOCKET_ACTIVATE,
    TWIST,
    Processes,
    free_port,
    get,
    processes,
    upstream,
    wait_for,
)
from tests.test_twist import twist  # noqa: F401 - a fixture

SERVING = re.compile(r"worker (\d+) \(pid (\d+)\) is serving")
ACCESS_LINE = re.compile(
    r'^127\.0\.0\.1 - - \[[^]]+\] "GET /d/f\.bin\?n=(\d+) HTTP/1\.1" 200 50000 "-" '
    r'"(Python-urllib/[0-9.]+|-)" (miss|hit|coalesced)$'
)


def parent_of(pid: int) -> Optional[int]:
    """The parent of a live process; ``None`` if it is gone (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[1])


def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def accepted_by(server_port: int, client_port: int, pids) -> Optional[int]:
    """
    Which of ``pids`` holds the server's end of the connection from
    ``client_port`` (the socket's inode in /proc/net/tcp, among each
    process's descriptors).
    """
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(address.split(":")[1], 16) for address in fields[1:3])
        # (A closed connection of earlier on the same ports, in TIME_WAIT,
        # has no socket: inode 0.)
        if (local, remote) == (server_port, client_port) and fields[9] != "0":
            inode = fields[9]
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                pass
    return None


def serving_pid(port: int, path: str, pids) -> int:
    """GET ``path`` on a connection kept open: which of ``pids`` answered it."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status
        return accepted_by(port, connection.sock.getsockname()[1], pids)
    finally:
        connection.close()


class Pkgcache:
    """``twist pkgcache`` on 127.0.0.1 in front of ``upstream``."""

    def __init__(self, processes: Processes, upstream_url: str, *options: str,
                 workers: Optional[str] = "2", **popen) -> None:
        directory = processes.directory
        self.processes = processes
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.cache = directory / "cache"
        self.access_log = directory / "access.log"
        argv = [
            str(TWIST), "--log-format=text", "pkgcache",
            *(["--workers", workers] if workers is not None else []),
            "--listen", f"tcp:{self.port}:interface=127.0.0.1",
            "--metrics-listen", f"tcp:{metrics_port}:interface=127.0.0.1",
            "--source", upstream_url, "--cache-dir", str(self.cache),
            "--access-log", str(self.access_log), *options,
        ]
        self.process = processes.start(argv, "pkgcache.log", **popen)
        self.workers = workers
        self.requests = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.processes.log(self.process)

    def serving(self, count: int = 2, timeout: float = 60) -> dict[int, int]:
        """Wait until workers 0 to ``count - 1`` serve; their pids by index."""
        def pids() -> dict[int, int]:
            return {int(index): int(pid) for index, pid in SERVING.findall(self.log())}

        wait_for(lambda: len(pids()) == count or self.process.poll() is not None,
                 timeout, f"{count} workers to serve")
        assert self.process.poll() is None, self.log()
        return pids()

    def ready(self) -> None:
        """Wait until it serves: its workers, or the one process without any."""
        if self.workers is None:
            wait_for(lambda: "Site starting on" in self.log(), 60, "twist to listen")
        else:
            self.serving()

    def fetch(self) -> None:
        """One more GET of /d/f.bin, numbered in its query (which the access log shows)."""
        status, body = get(f"{self.url}d/f.bin?n={self.requests}")
        assert status == 200, (status, body[:300], self.log())
        self.requests += 1

    def fetch_from(self, pids) -> int:
        """As :meth:`fetch`: which of ``pids`` answered."""
        pid = serving_pid(self.port, f"/d/f.bin?n={self.requests}", pids)
        self.requests += 1
        return pid

    def metrics(self) -> str:
        status, body = get(self.metrics_url)
        assert status == 200, body
        return body.decode()

    def requests_counted(self) -> float:
        """The metrics' sum of pkgcache_requests_total over every outcome."""
        return sum(map(float, re.findall(r"^pkgcache_requests_total\{.*\} (\S+)$",
                                         self.metrics(), re.MULTILINE)))

    def stop(self) -> None:
        """SIGTERM, as systemctl stop: a clean stop of the supervisor and every worker."""
        pids = [int(pid) for _, pid in SERVING.findall(self.log())]
        returncode = self.processes.stop(self.process)
        log = self.log()
        assert returncode in (0, -signal.SIGTERM), log
        assert "Main loop terminated." in log, log
        assert "Traceback" not in log, log
        assert [pid for pid in pids if parent_of(pid) is not None] == [], log


@pytest.fixture
def pkgcache(processes, upstream):
    """Start ``twist pkgcache`` in front of an upstream with /d/f.bin (50 kB)."""
    upstream_url, files, _ = upstream
    (files / "d").mkdir()
    (files / "d" / "f.bin").write_bytes(os.urandom(50_000))

    def start(*options: str, **kwargs) -> Pkgcache:
        return Pkgcache(processes, upstream_url, *options, **kwargs)

    return start


def test_every_worker_serves_and_the_counts_add_up(pkgcache):
    server = pkgcache()
    pids = server.serving()
    assert {parent_of(pid) for pid in pids.values()} == {server.pid}
    # The kernel gives each new connection to one of the workers accepting.
    served = set()
    while served != set(pids.values()):
        assert server.requests < 500, "one worker got no request in 500:\n" + server.log()
        served.add(server.fetch_from(pids.values()))

    # The supervisor's metrics are the sum of the workers'.
    wait_for(lambda: server.requests_counted() == server.requests, 30,
             f"the metrics to count {server.requests} requests")
    assert "pkgcache_workers 2.0" in server.metrics()

    # One access log, each request in it once, in whole lines.
    def access_lines() -> list[str]:
        return server.access_log.read_text().splitlines()

    wait_for(lambda: len(access_lines()) >= server.requests, 30, "the access log")
    numbers = []
    for line in access_lines():
        match = ACCESS_LINE.match(line)
        assert match, line
        numbers.append(int(match.group(1)))
    assert sorted(numbers) == list(range(server.requests))
    server.stop()


def test_a_killed_worker_is_restarted_while_the_others_serve(pkgcache):
    server = pkgcache()
    pids = server.serving()
    for _ in range(5):
        server.fetch()
    # Read by the supervisor before the kill, they are still counted after it.
    wait_for(lambda: server.requests_counted() == 5, 30, "the metrics to count 5 requests")

    os.kill(pids[0], signal.SIGKILL)
    for _ in range(20):
        server.fetch()
    wait_for(lambda: f"worker 0 (pid {pids[0]}) was killed by signal 9" in server.log(), 30,
             "the supervisor to log the death")
    wait_for(lambda: server.serving()[0] != pids[0], 30, "worker 0 to serve again")
    restarted = server.serving()[0]
    assert parent_of(restarted) == server.pid
    assert parent_of(pids[0]) is None
    assert sorted(children_of(server.pid)) == sorted([restarted, pids[1]])
    metrics = server.metrics()
    assert "pkgcache_worker_restarts_total 1.0" in metrics
    assert "pkgcache_workers 2.0" in metrics
    wait_for(lambda: server.requests_counted() == 25, 30, "the metrics to count 25 requests")
    server.fetch()
    server.stop()


def test_a_worker_that_keeps_dying_at_start_is_restarted_later_each_time(pkgcache):
    server = pkgcache()
    started = re.compile(r"worker 0 started \(pid (\d+)\)")
    killed: list[int] = []
    for _ in range(3):
        wait_for(lambda: len(started.findall(server.log())) > len(killed), 30,
                 "worker 0 to start again")
        pid = int(started.findall(server.log())[-1])
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    wait_for(lambda: server.log().count("restarting it in") == 3, 30, "three restarts")
    delays = re.findall(r"worker 0 \(pid \d+\) was killed by signal 9 after \S+ s; "
                        r"restarting it in (\S+) s", server.log())
    assert delays == ["0.5", "1.0", "2.0"], server.log()
    assert server.serving()[0] not in killed
    server.fetch()
    server.stop()


@pytest.mark.parametrize("workers", ["2", None])
def test_sighup_reopens_the_access_log(pkgcache, workers):
    """After logrotate moves the file away, SIGHUP: every process writes to a new one."""
    server = pkgcache(workers=workers)
    server.ready()
    if workers is None:
        reopened = ["] reopened the access log"]
    else:
        reopened = [f"worker {index}] reopened the access log" for index in (0, 1)]
    server.fetch()
    wait_for(lambda: server.access_log.exists() and server.access_log.read_text(), 30,
             "the first access log line")
    rotated = server.access_log.with_name("access.log.1")
    server.access_log.rename(rotated)
    os.kill(server.pid, signal.SIGHUP)
    wait_for(lambda: all(line in server.log() for line in reopened), 30,
             "every process to reopen the access log")
    for _ in range(4):
        server.fetch()
    wait_for(lambda: len(server.access_log.read_text().splitlines()) == 4, 30,
             "4 lines in the new access log")
    assert len(rotated.read_text().splitlines()) == 1
    if workers is not None:
        assert len(server.serving()) == 2 and "was killed" not in server.log()
    server.stop()


@pytest.mark.parametrize("workers", ["2", None])
def test_sigterm_right_after_requests_loses_no_access_log_line(pkgcache, workers):
    # Lines wait in memory up to a second (pkgcache.accesslog): stopping writes them.
    server = pkgcache(workers=workers)
    server.ready()
    for _ in range(10):
        server.fetch()
    server.stop()
    numbers = sorted(int(ACCESS_LINE.match(line).group(1))
                     for line in server.access_log.read_text().splitlines())
    assert numbers == list(range(10))


def test_a_metrics_port_in_use_is_one_clear_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(TWIST), "pkgcache", "--workers", "2", "--source", "http://127.0.0.1:1/",
             "--cache-dir", str(tmp_path / "cache"),
             "--listen", f"tcp:{free_port()}:interface=127.0.0.1",
             "--metrics-listen", f"tcp:{port}:interface=127.0.0.1"],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )
    assert result.returncode != 0
    assert f"pkgcache: cannot listen on port {port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert "worker 0 started" not in result.stdout + result.stderr


def test_workers_stop_when_the_supervisor_is_killed(pkgcache):
    server = pkgcache()
    pids = server.serving()
    server.fetch()
    server.process.kill()
    server.process.wait(timeout=30)
    wait_for(lambda: all(parent_of(pid) is None for pid in pids.values()), 30,
             "the workers to stop")
    assert server.log().count("the supervisor is gone; stopping") == 2, server.log()


def test_the_supervisor_alone_culls_what_every_worker_published(processes, upstream):
    upstream_url, files, _ = upstream
    (files / "d").mkdir()
    for name in ("a", "b", "c"):
        (files / "d" / name).write_bytes(os.urandom(100_000))
    server = Pkgcache(processes, upstream_url, "--max-cache-size", "250K")
    server.serving()
    for name in ("a", "b", "c"):
        status, _ = get(f"{server.url}d/{name}")
        assert status == 200
    # 300,000 bytes are past 250K (256,000): culled to 90% of it, one file left out.
    wait_for(lambda: "pkgcache_evictions_total 1.0" in server.metrics(), 30, "a cull")
    metrics = server.metrics()
    assert "pkgcache_cache_size_bytes 200000.0" in metrics
    assert "pkgcache_cache_files 2.0" in metrics
    assert len(list((server.cache / "d").iterdir())) == 2
    culls = [line for line in server.log().splitlines() if "culled 1 files" in line]
    assert len(culls) == 1 and "worker" not in culls[0], culls
    server.stop()


def test_unix_and_ssl_sockets_are_shared(processes, upstream, tmp_path):
    from twisted.internet import ssl

    key = ssl.KeyPair.generate(size=2048)
    pem = tmp_path / "server.pem"
    pem.write_bytes(key.selfSignedCert(1, CN="localhost").dumpPEM())  # the key, then the cert
    upstream_url, files, _ = upstream
    (files / "x.deb").write_bytes(b"deb" * 10_000)
    socket_path = tmp_path / "pkgcache.sock"
    tls_port = free_port()
    server = Pkgcache(
        processes, upstream_url,
        "--listen", f"unix:{socket_path}:mode=600",
        "--listen", f"ssl:{tls_port}:interface=127.0.0.1:privateKey={pem}",
    )
    server.serving()
    assert socket_path.stat().st_mode & 0o777 == 0o600
    for how in (["--unix-socket", str(socket_path), "http://localhost/x.deb"],
                ["--cacert", str(pem), f"https://localhost:{tls_port}/x.deb",
                 "--resolve", f"localhost:{tls_port}:127.0.0.1"]):
        for _ in range(3):
            result = subprocess.run(["curl", "-sS", "--fail", "--max-time", "20", *how],
                                    capture_output=True, timeout=30)
            assert result.returncode == 0, result.stderr
            assert result.stdout == b"deb" * 10_000
    server.stop()
    # The supervisor removes the socket's file, once, when the last worker stopped.
    assert not socket_path.exists()


def test_socket_activation_with_workers(tmp_path, processes, upstream):
    if SOCKET_ACTIVATE is None:
        pytest.skip("systemd-socket-activate is not installed (Debian package: systemd)")
    upstream_url, files, _ = upstream
    (files / "f").write_bytes(b"x" * 100_000)
    port = free_port()
    argv = [
        SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", "--fdname=web",
        str(TWIST), "--log-format=text", "pkgcache", "--workers", "2",
        "--listen", "systemd:domain=INET:name=web",
        "--source", upstream_url, "--cache-dir", str(tmp_path / "cache"),
    ]
    activated = processes.start(argv, "pkgcache.log")
    processes.wait_for_log(activated, r"Listening on ", timeout=30)
    # The first connection starts twist: it waits in the socket's backlog.
    status, body = get(f"http://127.0.0.1:{port}/f", timeout=60)
    assert (status, body) == (200, b"x" * 100_000), processes.log(activated)
    pids = set()
    for index in (0, 1):
        match = processes.wait_for_log(
            activated, rf"worker {index} \(pid (\d+)\) is serving", timeout=60
        )
        pids.add(int(match.group(1)))
    assert {parent_of(pid) for pid in pids} == {activated.pid}  # twist, exec'd in its place
    served = set()
    for _ in range(500):
        served.add(serving_pid(port, "/f", pids))
        if served == pids:
            break
    assert served == pids, processes.log(activated)
    returncode = processes.stop(activated)
    log = processes.log(activated)
    assert returncode in (0, -signal.SIGTERM), log
    assert "Main loop terminated." in log and "Traceback" not in log, log


def test_workers_auto_is_one_per_cpu(pkgcache):
    cpus = sorted(os.sched_getaffinity(0))[:2]
    server = pkgcache(workers="auto", preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    if len(cpus) == 1:
        pytest.skip("one CPU: auto is one process, as --workers 1")
    server.serving(len(cpus))
    assert f"worker {len(cpus)} started" not in server.log()
    server.fetch()
    server.stop()


@pytest.mark.parametrize("workers", ["1", None])
def test_one_worker_is_one_process_as_before(pkgcache, workers):
    server = pkgcache(workers=workers)
    wait_for(lambda: "Site starting on" in server.log() or server.process.poll() is not None,
             60, "twist to listen")
    server.fetch()
    assert children_of(server.pid) == []
    assert "worker" not in server.log()
    assert server.processes.stop(server.process) in (0, -signal.SIGTERM)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "--workers: a whole number of at least 1, or auto, not '0'"),
        (["--workers", "x"], "--workers: a whole number of at least 1, or auto, not 'x'"),
        (["--workers", "-2"], "--workers: a whole number of at least 1, or auto, not '-2'"),
        (["--workers", "2", "--listen", "stdio:"],
         "--listen 'stdio:': --workers can share tcp, tcp6, ssl, unix and systemd endpoints only"),
    ],
)
def test_bad_worker_counts_are_usage_errors(tmp_path, args, message):
    result = subprocess.run(
        [str(TWIST), "pkgcache", "--source", "http://127.0.0.1:1/",
         "--cache-dir", str(tmp_path / "cache"), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert message in output
    assert "Traceback" not in output


# --- Without processes -------------------------------------------------------


def options(*args: str, tmp_path: Path) -> Options:
    config = Options()
    config.parseOptions(["--source", "http://127.0.0.1:1/", "--cache-dir", str(tmp_path), *args])
    return config


def test_worker_counts(tmp_path):
    assert options(tmp_path=tmp_path)["workers"] == 1
    assert options("--workers", "3", tmp_path=tmp_path)["workers"] == 3
    assert options("--workers", "auto", tmp_path=tmp_path)["workers"] == len(
        os.sched_getaffinity(0)
    )
    config_file = tmp_path / "pkgcache.toml"
    config_file.write_text("workers = 4\n")
    assert options("--config", str(config_file), tmp_path=tmp_path)["workers"] == 4


def test_make_service_supervises_only_more_than_one_worker(tmp_path):
    assert isinstance(makeService(options(tmp_path=tmp_path)), PackageCacheService)
    supervisor = makeService(options("--workers", "2", tmp_path=tmp_path))
    assert isinstance(supervisor, workers.Supervisor)
    assert len(supervisor.workers) == 2


def _registry(hits: int, in_flight: int) -> CollectorRegistry:
    registry = CollectorRegistry()
    requests = Counter("pkgcache_requests", "Requests.", ["outcome"], registry=registry)
    requests.labels("hit").inc(hits)
    requests.labels("miss").inc()
    Gauge("pkgcache_downloads_in_flight", "Downloads.", registry=registry).set(in_flight)
    return registry


def test_one_process_metrics_come_out_as_they_went_in():
    registry = _registry(3, 1)
    families = workers.registry_families(registry)
    assert workers.families_text(workers.sum_families([families])) == generate_latest(registry)


def test_metrics_of_workers_are_summed():
    one = workers.registry_families(_registry(3, 1))
    two = workers.registry_families(_registry(4, 2))
    text = workers.families_text(workers.sum_families([one, two])).decode()
    assert 'pkgcache_requests_total{outcome="hit"} 7.0' in text
    assert 'pkgcache_requests_total{outcome="miss"} 2.0' in text
    assert "pkgcache_downloads_in_flight 3.0" in text
    # A dead worker's counters still count; its gauges do not.
    retired = workers.sum_families([workers.counters_only(one)])
    text = workers.families_text(workers.sum_families([retired, two])).decode()
    assert 'pkgcache_requests_total{outcome="hit"} 7.0' in text
    assert "pkgcache_downloads_in_flight 2.0" in text


def test_a_counter_was_created_when_its_first_worker_made_it():
    def family(total: float, created: float) -> list[dict]:
        return [{"name": "x", "type": "counter", "help": "X.", "unit": "",
                 "samples": [["x_total", {}, total], ["x_created", {}, created]]}]

    [summed] = workers.sum_families([family(1, 50.0), family(2, 30.0), family(3, 40.0)])
    assert summed["samples"] == [["x_total", {}, 6], ["x_created", {}, 30.0]]


def test_standard_output_is_written_in_whole_lines_of_pipe_size():
    lines = [b"a" * 1000 + b"\n"] * 9 + [b"b" * 5000 + b"\n", b"c\n"]
    pieces = list(whole_lines(b"".join(lines), 4096))
    assert b"".join(pieces) == b"".join(lines)
    assert [len(piece) for piece in pieces] == [4004, 4004, 1001, 5001, 2]


class _Transport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list = []

    def writeToChild(self, fd: int, data: bytes) -> None:
        pass

    def signalProcess(self, signal) -> None:
        self.signals.append(signal)


class _ProcessReactor(Clock):
    """A clock that spawns nothing, and counts what it was asked to spawn."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list = []

    def spawnProcess(self, protocol, executable, args, env, childFDs):
        assert "LISTEN_FDS" not in env
        assert childFDs[0] == "w" and childFDs[3] == "r"
        transport = _Transport(1000 + len(self.spawned))
        protocol.makeConnection(transport)
        self.spawned.append(transport)
        return transport


def test_restarts_back_off_only_for_workers_that_die_young(tmp_path):
    reactor = _ProcessReactor()
    supervisor = workers.Supervisor(options("--workers", "2", tmp_path=tmp_path), reactor)
    worker = supervisor.workers[0]
    worker.start()
    killed = Failure(ProcessTerminated(signal=9))
    delays = []
    for _ in range(8):
        reactor.advance(1)
        worker.processEnded(killed)
        [restart] = reactor.getDelayedCalls()
        delays.append(restart.getTime() - reactor.seconds())
        reactor.advance(delays[-1])
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert len(reactor.spawned) == 9
    # A worker that was serving for a while is restarted at once, and the
    # next early death starts from the shortest delay again.
    worker.childDataReceived(3, b'{"event": "ready"}\n')
    reactor.advance(workers.MIN_UPTIME)
    worker.processEnded(killed)
    [restart] = reactor.getDelayedCalls()
    assert restart.getTime() == reactor.seconds()
    reactor.advance(0)
    reactor.advance(1)
    worker.processEnded(killed)
    [restart] = reactor.getDelayedCalls()
    assert restart.getTime() - reactor.seconds() == 0.5
    assert supervisor.restarts._value.get() == 9


def test_stopping_cancels_a_restart_and_a_worker_that_ignores_sigterm_is_killed(tmp_path):
    reactor = _ProcessReactor()
    supervisor = workers.Supervisor(options("--workers", "2", tmp_path=tmp_path), reactor)
    dead, stubborn = supervisor.workers
    dead.start()
    stubborn.start()
    dead.processEnded(Failure(ProcessTerminated(signal=9)))
    assert reactor.getDelayedCalls()
    stopped = supervisor.stopService()
    assert stubborn.transport.signals == ["TERM"]
    reactor.advance(workers.STOP_TIMEOUT)
    assert stubborn.transport.signals == ["TERM", "KILL"]
    stubborn.processEnded(Failure(ProcessTerminated(signal=9)))
    assert [call for call in reactor.getDelayedCalls() if call.active()] == []
    results: list = []
    stopped.addBoth(results.append)
    assert results == [None]
    assert len(reactor.spawned) == 2


@pytest_twisted.ensureDeferred
async def test_a_burst_spread_over_the_workers_makes_one_upstream_request(
    origin, twist, http, tmp_path
):
    """
    Clients of both workers on one uncached file: one upstream request, and
    every client has its first bytes while the origin still holds the rest
    (so the workers' clients follow one download, not wait for the file).
    """
    data = os.urandom(3_000_000)
    gate = Gate()
    origin.add("/burst.tar", data, gate=gate, pause_at=300_000)
    pkgcache = twist("--workers", "2", "--source", origin.url, "--cache-dir", str(tmp_path / "cache"))
    await pkgcache.ready(http)
    await wait_for_twisted(lambda: len(SERVING.findall(pkgcache.log.read_text())) == 2)
    worker_pids = {int(pid) for _, pid in SERVING.findall(pkgcache.log.read_text())}
    request = b"GET /burst.tar HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
    clients: dict[int, list] = {pid: [] for pid in worker_pids}
    # The kernel picks the worker of each connection: more clients come
    # until each worker has some (a bounded number).
    for _ in range(200):
        if sum(map(len, clients.values())) >= 20 and all(clients.values()):
            break
        client = await open_raw(pkgcache.url, request)
        await within(10, wait_for_twisted(lambda: b"\r\n\r\n" in client.received),
                     "a client got no headers while the origin held the body")
        port = client.transport.getHost().port
        clients[accepted_by(pkgcache.port, port, worker_pids)].append(client)
    assert all(clients.values()), {pid: len(c) for pid, c in clients.items()}
    everyone = [client for some in clients.values() for client in some]
    await wait_for_twisted(lambda: all(len(c.received) > 100_000 for c in everyone))
    assert origin.count("/burst.tar") == 1
    gate.open()
    for client in everyone:
        received = await within(30, client.closed, "a client's download did not end")
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and body == data
    assert origin.count("/burst.tar") == 1
