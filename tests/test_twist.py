"""
The installed ``twist pkgcache``, as a real process: plugin discovery,
downloads through it, start-up errors, and ``kill -9`` mid-download.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import pytest_twisted
from twisted.internet.error import ConnectionRefusedError

from tests.clients import sha256, start_reading, within
from tests.conftest import fetch, sleep, wait_for
from tests.origin import Gate

BIN = Path(sys.executable).parent
TWIST = BIN / "twist"

pytestmark = pytest.mark.skipif(
    not TWIST.exists(), reason=f"twist is not installed next to {sys.executable}"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TwistProcess:
    """``twist pkgcache`` running in a subprocess, on 127.0.0.1."""

    def __init__(self, *args: str, cwd: Path, port: Optional[int] = None) -> None:
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = cwd / f"twist-{self.port}.log"
        self.process = subprocess.Popen(
            [str(TWIST), "--log-format=text", "pkgcache",
             "--listen", f"tcp:{self.port}:interface=127.0.0.1", *args],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, cwd=cwd,
        )

    async def ready(self, http) -> None:
        """Wait until it answers HTTP."""
        async def answering() -> bool:
            try:
                await fetch(http, self.url + "/")
            except ConnectionRefusedError:
                return False
            return True

        for _ in range(200):
            if self.process.poll() is not None:
                raise AssertionError(f"twist exited: {self.log.read_text()}")
            if await answering():
                return
            await sleep(0.05)
        raise AssertionError("twist did not start listening in 10 s")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(timeout=10)


@pytest.fixture
def twist(tmp_path):
    started: list[TwistProcess] = []

    def start(*args: str, port: Optional[int] = None) -> TwistProcess:
        process = TwistProcess(*args, cwd=tmp_path, port=port)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def test_plugin_is_found_in_the_installed_package(tmp_path):
    # Run from elsewhere, so only the installed copy can be found.
    code = (
        "from twisted.plugin import getPlugins\n"
        "from twisted.application.service import IServiceMaker\n"
        "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert "'pkgcache'" in output.stdout, output.stderr


def test_help_documents_every_option(tmp_path):
    result = subprocess.run(
        [str(TWIST), "pkgcache", "--help"], cwd=tmp_path, capture_output=True, text=True,
        timeout=60,
    )
    assert result.returncode == 0
    for option in ("--source", "--cache-dir", "--listen", "--connect-timeout", "--idle-timeout",
                   "--volatile", "--volatile-max-age", "--negative-max-age", "--stale-if-error"):
        assert option in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "at least one --source"),
        (["--source", "gopher://x/"], "not an http:// or https:// URL"),
        (["--source", "http://x/", "--cache-dir", "/proc/nope"], "cannot use /proc/nope"),
        (["--source", "http://x/", "--metrics-listen", "nonsense:1"], "--metrics-listen"),
        (["--source", "http://x/", "--access-log", "/proc/nope.log"], "--access-log"),
        (["--source", "http://x/", "--no-such-option"], "no-such-option"),
        (["--source", "http://x/", "--volatile", "dists/(x"], "not a regular expression"),
        (["--source", "http://x/", "--volatile-max-age", "-3"], "--volatile-max-age"),
    ],
)
def test_bad_command_lines_exit_non_zero_with_a_message(tmp_path, args, message):
    result = subprocess.run(
        [str(TWIST), "pkgcache", *args], cwd=tmp_path, capture_output=True, text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("option", ["--listen", "--metrics-listen"])
def test_a_port_in_use_is_one_clear_line(tmp_path, option):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(TWIST), "pkgcache", "--source", "http://127.0.0.1:1/",
             "--cache-dir", str(tmp_path / "cache"),
             "--listen", f"tcp:{free_port()}:interface=127.0.0.1",
             option, f"tcp:{port}:interface=127.0.0.1"],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )
    assert result.returncode != 0
    assert f"pkgcache: cannot listen on port {port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest_twisted.ensureDeferred
async def test_download_through_twist_then_hit_with_source_gone(origin, twist, http, tmp_path):
    data = os.urandom(2_000_000)
    origin.add("/distfiles/foo-1.0.tar.gz", data)
    cache = tmp_path / "cache"
    access_log = tmp_path / "access.log"
    metrics_port = free_port()
    server = twist(
        "--source", origin.url, "--cache-dir", str(cache), "--access-log", str(access_log),
        "--metrics-listen", f"tcp:{metrics_port}:interface=127.0.0.1",
    )
    await server.ready(http)
    response, body = await fetch(http, server.url + "/distfiles/foo-1.0.tar.gz")
    assert (response.code, sha256(body)) == (200, sha256(data))
    await wait_for(lambda: (cache / "distfiles" / "foo-1.0.tar.gz").exists())
    await origin.stop()
    response, body = await fetch(http, server.url + "/distfiles/foo-1.0.tar.gz")
    assert (response.code, sha256(body)) == (200, sha256(data))
    assert origin.count("/distfiles/foo-1.0.tar.gz") == 1
    # The server writes the log, the access log and the metrics once the
    # response is finished, which may be after we have read it: wait for
    # each, rather than assume the others came with the first.
    await wait_for(lambda: access_log.read_text().endswith(" hit\n"))
    # The request line is logged only if asked for (it would cost a hit a
    # quarter of its time).
    assert "GET /distfiles/foo-1.0.tar.gz" not in server.log.read_text()
    entries = access_log.read_text().splitlines()
    assert entries[-2].endswith('"GET /distfiles/foo-1.0.tar.gz HTTP/1.1" 200 2000000 "-" "-" miss')
    assert entries[-1].endswith('"GET /distfiles/foo-1.0.tar.gz HTTP/1.1" 200 2000000 "-" "-" hit')
    for _ in range(100):
        _, metrics = await fetch(http, f"http://127.0.0.1:{metrics_port}/metrics")
        if b'pkgcache_requests_total{mirror="",outcome="hit"} 1.0' in metrics:
            break
        await sleep(0.05)
    assert b'pkgcache_requests_total{mirror="",outcome="hit"} 1.0' in metrics
    assert b'pkgcache_requests_total{mirror="",outcome="miss"} 1.0' in metrics


@pytest_twisted.ensureDeferred
async def test_kill_9_mid_download_publishes_nothing_and_restart_recovers(
    origin, twist, http, tmp_path
):
    data = os.urandom(3_000_000)
    # The download stops mid-way (600 kB spooled) and stays there until killed.
    origin.add("/big.tar", data, gate=Gate(), pause_at=600_000)
    cache = tmp_path / "cache"
    spool = cache / ".pkgcache-spool"
    server = twist("--source", origin.url, "--cache-dir", str(cache))
    await server.ready(http)
    _, reader = await start_reading(http, server.url + "/big.tar")
    reader.done.addErrback(lambda _: None)
    await wait_for(lambda: any(p.stat().st_size == 600_000 for p in spool.iterdir()))
    server.kill(signal.SIGKILL)
    assert not (cache / "big.tar").exists()
    assert len(list(spool.iterdir())) == 1  # the crashed process's spool

    origin.add("/big.tar", data)
    restarted = twist("--source", origin.url, "--cache-dir", str(cache))
    await restarted.ready(http)
    assert list(spool.iterdir()) == []
    response, body = await fetch(http, restarted.url + "/big.tar")
    assert sha256(body) == sha256(data)
    await wait_for(lambda: (cache / "big.tar").exists())
    assert sha256((cache / "big.tar").read_bytes()) == sha256(data)
    assert origin.count("/big.tar") == 2


@pytest_twisted.ensureDeferred
async def test_unix_and_ssl_endpoints(origin, twist, http, tmp_path):
    from twisted.internet import ssl
    from twisted.internet.utils import getProcessOutputAndValue

    key = ssl.KeyPair.generate(size=2048)
    certificate = key.selfSignedCert(1, CN="localhost")
    pem = tmp_path / "server.pem"
    pem.write_bytes(certificate.dumpPEM())
    # A small file (one write) and a big one (sendfile on the unix socket,
    # never past TLS), each a miss, then a hit.
    files = {"/pool/x.deb": os.urandom(100_000), "/pool/big.deb": os.urandom(1_000_000)}
    for path, data in files.items():
        origin.add(path, data)
    socket_path = tmp_path / "pkgcache.sock"
    tls_port = free_port()
    server = twist(
        "--source", origin.url, "--cache-dir", str(tmp_path / "cache"),
        "--listen", f"unix:{socket_path}",
        "--listen", f"ssl:{tls_port}:interface=127.0.0.1:privateKey={pem}",
    )
    await server.ready(http)
    for how in (lambda path: ["--unix-socket", str(socket_path), f"http://localhost{path}"],
                lambda path: ["--cacert", str(pem), f"https://localhost:{tls_port}{path}",
                              "--resolve", f"localhost:{tls_port}:127.0.0.1"]):
        for _ in range(2):
            for path, data in files.items():
                output, err, code = await getProcessOutputAndValue(
                    "curl", ["-sS", "--fail", "--max-time", "20", *how(path)]
                )
                assert code == 0, err
                assert output == data
                await wait_for(lambda: (tmp_path / "cache" / path.lstrip("/")).exists())
    assert [origin.count(path) for path in files] == [1, 1]


@pytest_twisted.ensureDeferred
async def test_two_processes_share_one_cache_dir(origin, twist, http, tmp_path):
    data = os.urandom(3_000_000)
    # The download holds after 300 kB until the test lets it go on.
    gate = Gate()
    origin.add("/shared.tar", data, gate=gate, pause_at=300_000)
    cache = tmp_path / "cache"
    first = twist("--source", origin.url, "--cache-dir", str(cache))
    await first.ready(http)
    _, early = await start_reading(http, first.url + "/shared.tar")
    await early.first_byte
    # The second one starts (sweeping stale spools) while the first downloads.
    second = twist("--source", origin.url, "--cache-dir", str(cache))
    await second.ready(http)
    assert len(list((cache / ".pkgcache-spool").iterdir())) == 1, "the live spool was swept"
    # Its clients follow the first one's download: their first bytes come
    # while the origin still holds the rest, and nothing is asked again.
    late = [await start_reading(http, second.url + "/shared.tar") for _ in range(3)]
    for response, reader in late:
        await within(10, reader.first_byte, "a follower waited for the whole download")
        assert response.length == len(data)
        assert b"collapsed" in response.headers.getRawHeaders(b"cache-status")[0]
    assert origin.count("/shared.tar") == 1
    gate.open()
    assert sha256(await early.done) == sha256(data)
    for _, reader in late:
        assert sha256(await reader.done) == sha256(data)
    await wait_for(lambda: list((cache / ".pkgcache-spool").iterdir()) == [])
    assert sha256((cache / "shared.tar").read_bytes()) == sha256(data)
    assert origin.count("/shared.tar") == 1
