"""
The installed ``twist pkgcache`` under real socket activation.

``systemd-socket-activate`` (from Debian's ``systemd`` package) does what
``pkgcache.socket`` does: it binds the port, waits for the first connection,
then execs the service's command line with ``LISTEN_FDS``, ``LISTEN_PID`` and
``LISTEN_FDNAMES`` set.  Behind it runs the command line of the shipped
``contrib/systemd/pkgcache.service`` with the options of ``pkgcache.default``
(only the twist path, the cache directory and the sources are changed), in
front of a real HTTP server on 127.0.0.1.

Every wait has a deadline, and every process started here is killed in a
fixture's teardown.
"""

from __future__ import annotations

import configparser
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
TWIST = Path(sys.executable).parent / "twist"


def _find_socket_activate() -> Optional[str]:
    # /usr/bin on Debian 10 and later; /lib/systemd on some older systems.
    candidates = ["/usr/bin/systemd-socket-activate", "/lib/systemd/systemd-socket-activate"]
    found = shutil.which("systemd-socket-activate")
    return found or next((path for path in candidates if os.access(path, os.X_OK)), None)


SOCKET_ACTIVATE = _find_socket_activate()

pytestmark = pytest.mark.skipif(
    SOCKET_ACTIVATE is None,
    reason="systemd-socket-activate is not installed (Debian package: systemd)",
)

# No proxy from the environment may come between the test and 127.0.0.1.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def read_unit(name: str) -> configparser.ConfigParser:
    """A unit file's sections; for a key given twice, the last value."""
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # keys are case-sensitive
    unit.read(UNITS / name, encoding="utf-8")
    return unit


def free_port() -> int:
    """
    A TCP port nothing listens on right now (on any address), below the
    kernel's ephemeral range: a port from that range, given by ``bind``
    to port 0, may be taken as the local port of some outgoing connection
    before the process it is meant for listens on it.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            ephemeral_low = int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    for _ in range(1000):
        port = _ports.randrange(10000, max(10001, ephemeral_low))
        if port in _given_ports:
            continue  # (given to a process that may not listen yet)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
        _given_ports.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


_ports = random.Random()
_given_ports: set[int] = set()


def has_ipv6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def dual_stack_by_default() -> bool:
    """Whether a socket bound to [::] also accepts IPv4 (the kernel default)."""
    try:
        return Path("/proc/sys/net/ipv6/bindv6only").read_text().strip() == "0"
    except OSError:
        return False


def get(url: str, timeout: float = 30) -> tuple[int, bytes]:
    """GET ``url``: its status and whole body; HTTP errors are returned too."""
    try:
        with OPENER.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Processes:
    """Starts processes, and kills whatever is still running at teardown."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[subprocess.Popen] = []

    def start(self, argv: list[str], log_name: str, **kwargs) -> subprocess.Popen:
        log = (self.directory / log_name).open("wb")
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=self.directory, start_new_session=True, **kwargs,
        )
        log.close()
        process.log_path = self.directory / log_name  # type: ignore[attr-defined]
        self.started.append(process)
        return process

    def log(self, process: subprocess.Popen) -> str:
        return process.log_path.read_text(errors="replace")  # type: ignore[attr-defined]

    def wait_for_log(self, process: subprocess.Popen, pattern: str, timeout: float) -> re.Match:
        """Wait until ``pattern`` appears in the process's output."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log(process))
            if match:
                return match
            if process.poll() is not None:
                raise AssertionError(
                    f"{process.args[0]} exited ({process.returncode}) before printing "
                    f"{pattern!r}:\n{self.log(process)}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{process.args[0]} did not print {pattern!r} in {timeout} s:\n"
                    f"{self.log(process)}"
                )
            time.sleep(0.05)

    def stop(self, process: subprocess.Popen, timeout: float = 15) -> int:
        """SIGTERM (what ``systemctl stop`` sends), then SIGKILL if need be."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)
            raise AssertionError(
                f"{process.args[0]} ignored SIGTERM for {timeout} s:\n{self.log(process)}"
            ) from None

    def kill_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=15)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    # The installed twist, not the source tree: a missing one is a failure
    # (of the installation), not a reason to skip.
    assert TWIST.exists(), f"{TWIST} is missing: pip install pkgcache into this environment"
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


@pytest.fixture
def upstream(tmp_path: Path, processes: Processes):
    """
    A real HTTP server (``python -m http.server``) on 127.0.0.1, serving a
    ``files`` directory; yields ``(url, files, process)``.
    """
    files = tmp_path / "upstream"
    files.mkdir()
    server = processes.start(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
         "--directory", str(files)],
        "upstream.log",
    )
    # Port 0: the server picks a free port and says which, so no race.
    port = processes.wait_for_log(server, r"port (\d+)", timeout=30).group(1)
    url = f"http://127.0.0.1:{port}/"
    wait_for(lambda: get(url, timeout=5)[0] == 200, 30, "the upstream server to answer")
    return url, files, server


def shipped_setting(name: str) -> str:
    """The value pkgcache.default gives ``name`` (a one-line assignment)."""
    text = (UNITS / "pkgcache.default").read_text(encoding="utf-8")
    values = re.findall(rf"^{name}=(.*)$", text, re.MULTILINE)
    assert len(values) == 1, values
    return values[0].strip()


def shipped_command(cache_dir: Path, sources: str, options: Optional[str] = None) -> list[str]:
    """
    ``ExecStart=`` of the shipped pkgcache.service, with this venv's twist,
    ``cache_dir`` for the cache, ``sources`` as ``$PKGCACHE_SOURCES`` and
    ``options`` (by default pkgcache.default's) as ``$PKGCACHE_OPTIONS``.
    An unbraced ``$VAR`` is split as systemd splits it: on whitespace, with
    shell-like quotes.
    """
    service = read_unit("pkgcache.service")
    cache_directory = "/var/cache/" + service["Service"]["CacheDirectory"]
    environment = {
        "PKGCACHE_SOURCES": sources,
        "PKGCACHE_OPTIONS": shipped_setting("PKGCACHE_OPTIONS") if options is None else options,
    }
    argv: list[str] = []
    for word in shlex.split(service["Service"]["ExecStart"]):
        if word.startswith("$") and not word.startswith("${"):
            argv.extend(shlex.split(environment[word[1:]]))
        elif word == cache_directory:
            argv.append(str(cache_dir))
        else:
            assert "$" not in word, f"unexpected variable in ExecStart: {word}"
            argv.append(word)
    assert Path(argv[0]).name == "twist", argv
    argv[0] = str(TWIST)
    return argv


def listen_argument(argv: list[str]) -> str:
    return argv[argv.index("--listen") + 1]


def check_download_then_hit(
    processes: Processes,
    upstream,
    activate_argv: list[str],
    pkgcache_url: str,
    cache_dir: Path,
) -> None:
    """
    Start pkgcache behind ``systemd-socket-activate``, download a file
    through it, stop the upstream, get it again from the cache, and stop
    pkgcache as ``systemctl stop`` would.
    """
    upstream_url, files, upstream_server = upstream
    data = os.urandom(700_000) + b"end of file"
    (files / "distfiles" / "ab").mkdir(parents=True)
    (files / "distfiles" / "ab" / "foo-1.2.tar.gz").write_bytes(data)

    activated = processes.start(activate_argv, "pkgcache.log")
    # It binds before it prints this; then it waits for a connection.
    processes.wait_for_log(activated, r"Listening on ", timeout=30)

    # The first connection is accepted by the kernel on the inherited socket
    # and starts twist, which answers it: nothing may be lost in between.
    status, body = get(pkgcache_url + "distfiles/ab/foo-1.2.tar.gz", timeout=60)
    assert status == 200, (status, body[:500], processes.log(activated))
    assert body == data
    # systemd-socket-activate exec'd twist in its own process, so that
    # LISTEN_PID matched.
    assert activated.poll() is None, processes.log(activated)

    cached = cache_dir / "distfiles" / "ab" / "foo-1.2.tar.gz"
    wait_for(cached.exists, 30, f"{cached} to be published")
    assert cached.read_bytes() == data

    # With the upstream gone, only the cache can answer.
    processes.stop(upstream_server)
    status, body = get(pkgcache_url + "distfiles/ab/foo-1.2.tar.gz")
    assert status == 200, (status, body[:500], processes.log(activated))
    assert body == data
    status, _ = get(pkgcache_url + "distfiles/ab/not-cached-1.0.tar.gz")
    assert status in (502, 504), status

    # systemctl stop sends SIGTERM.  twist shuts down, then dies of that same
    # signal so its parent knows why; systemd counts a death by SIGTERM (like
    # exit status 0) as a clean stop, anything else as a failure.
    returncode = processes.stop(activated)
    log = processes.log(activated)
    assert returncode in (0, -signal.SIGTERM), log
    assert "Main loop terminated." in log, log
    assert "Traceback" not in log, log


def test_shipped_service_command_line_on_a_dual_stack_socket(tmp_path, processes, upstream):
    """
    What ``pkgcache.socket`` + ``pkgcache.service`` do: a bare port (a
    dual-stack IPv6 socket on every address, as ``ListenStream=PORT`` makes)
    named by ``FileDescriptorName=``, and the service's own command line, with
    two ``--source`` flags passed through one variable.
    """
    if not has_ipv6():
        pytest.skip("no IPv6 on this host: a bare ListenStream= port is IPv4 only here, "
                    "and the shipped domain=INET6 does not apply")
    if not dual_stack_by_default():
        pytest.skip("net.ipv6.bindv6only=1: a bare port does not accept IPv4 here")
    socket_unit = read_unit("pkgcache.socket")
    port = free_port()
    cache_dir = tmp_path / "cache"
    upstream_url = upstream[0]
    # The first source answers; the second is a port nothing listens on.
    twist = shipped_command(
        cache_dir, f"--source {upstream_url} --source http://127.0.0.1:{free_port()}/"
    )
    assert listen_argument(twist) == (
        f"systemd:domain=INET6:name={socket_unit['Socket']['FileDescriptorName']}"
    )
    argv = [
        SOCKET_ACTIVATE,
        f"--listen={port}",
        f"--fdname={socket_unit['Socket']['FileDescriptorName']}",
        *twist,
    ]
    # IPv4 through the dual-stack socket.
    check_download_then_hit(processes, upstream, argv, f"http://127.0.0.1:{port}/", cache_dir)


def test_ipv4_loopback_socket_with_another_name(tmp_path, processes, upstream):
    """
    ``ListenStream=127.0.0.1:PORT`` is an IPv4 socket: ``domain=INET``; any
    ``FileDescriptorName=`` works when ``name=`` matches it.
    """
    port = free_port()
    cache_dir = tmp_path / "cache"
    argv = [
        SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", "--fdname=web",
        str(TWIST), "--log-format=text", "pkgcache",
        "--listen", "systemd:domain=INET:name=web",
        "--source", upstream[0], "--cache-dir", str(cache_dir),
    ]
    check_download_then_hit(processes, upstream, argv, f"http://127.0.0.1:{port}/", cache_dir)


def test_the_service_reads_its_mirrors_from_a_config_file(tmp_path, processes, upstream):
    """
    ``PKGCACHE_SOURCES`` empty and ``PKGCACHE_OPTIONS=--config FILE``, as
    pkgcache.default says for several mirrors: the file's mirror is served
    at ``/NAME/`` on the activated socket, and kept in ``CACHE_DIR/NAME/``
    (the unit's ``--cache-dir`` winning over the file's).
    """
    config = tmp_path / "pkgcache.toml"
    config.write_text(
        f'cache-dir = "{tmp_path}/not-this-one"\n'
        f'[mirrors.gentoo]\nkind = "gentoo"\nsources = ["{upstream[0]}"]\n'
    )
    port = free_port()
    cache_dir = tmp_path / "cache"
    twist = [
        word.replace("systemd:domain=INET6:", "systemd:domain=INET:")
        for word in shipped_command(cache_dir, "", f"--config {config}")
    ]
    name = read_unit("pkgcache.socket")["Socket"]["FileDescriptorName"]
    argv = [SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", f"--fdname={name}", *twist]
    check_download_then_hit(
        processes, upstream, argv, f"http://127.0.0.1:{port}/gentoo/", cache_dir / "gentoo"
    )
    assert not (tmp_path / "not-this-one").exists()


def test_a_descriptor_name_that_was_not_passed_is_a_clear_error(tmp_path, processes):
    """A FileDescriptorName= / name= mismatch stops start-up with one message."""
    port = free_port()
    argv = [
        SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", "--fdname=pkgcache",
        str(TWIST), "--log-format=text", "pkgcache",
        "--listen", "systemd:domain=INET:name=other",
        "--source", "http://127.0.0.1:1/", "--cache-dir", str(tmp_path / "cache"),
    ]
    activated = processes.start(argv, "pkgcache.log")
    processes.wait_for_log(activated, r"Listening on ", timeout=30)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        # twist starts now, and must exit rather than serve nothing.
        returncode = activated.wait(timeout=60)
        client.settimeout(30)
        try:
            leftover = client.recv(1024)
        except ConnectionResetError:
            leftover = b""
    log = processes.log(activated)
    assert returncode != 0, log
    assert leftover == b"", log
    assert "systemd:domain=INET:name=other" in log, log
    assert "Traceback" not in log, log
