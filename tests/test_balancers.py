"""
Three ``twist pkgcache`` nodes behind the shipped sharding recipes, run by
the real balancers of Debian's packages: ``contrib/nginx/pkgcache-shard.conf``
under nginx, ``contrib/haproxy/pkgcache-shard.cfg`` under HAProxy.  Each
recipe is used as shipped, only its addresses changed (the nodes', and its
own: 127.0.0.1 on free ports; for a fourth node, the third node's line
copied); around it goes what a Debian system would provide (nginx's main
configuration, HAProxy's global section), pointed at the test's directory.

Each node has a cache directory of its own and the counting origin of
``tests/origin.py`` as its source, so which node holds a file, and how many
times the origin was asked for it, show where the balancer sent each path:

- a big download streams through: first bytes before the origin sends the
  rest;
- many clients asking for every file (some with query strings, which
  pkgcache ignores): one origin download per file in the whole cluster,
  every body whole;
- a node killed (SIGKILL): clients still get every file; only that node's
  files move (each downloaded once more, by one new owner, which keeps it
  once the balancer has taken the node out), the others stay;
- the node started again on its port and cache: its files come back to it,
  served from its cache, with no origin download;
- a fourth node added to the configuration: it takes a share of the files,
  and no other file moves;
- a node that stays up but whose cache directory cannot take a file (its
  health URL says 503): HAProxy's check takes it out, only its files move,
  and once it can store files again it is put back and takes them back;
  nginx open source, which cannot poll a health URL, keeps it (it still
  answers every request, its misses streamed uncached).

Every process is started in a session of its own and every session is
killed at teardown, whatever happened; every wait is for an event (a port
answering, HAProxy's stats saying a server is down or up, nginx's error log
saying a server is disabled, a line in a node's access log) with a deadline.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import socket
from pathlib import Path
from typing import Optional

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ConnectError
from twisted.web.client import (
    Agent, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived, readBody,
)

from tests.clients import start_reading, within
from tests.conftest import fetch, sleep
from tests.origin import Gate
from tests.test_socket_activation import (  # noqa: F401 - processes is a fixture
    TWIST,
    Processes,
    free_port,
    processes,
)

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
NGINX_RECIPE = CONTRIB / "nginx" / "pkgcache-shard.conf"
HAPROXY_RECIPE = CONTRIB / "haproxy" / "pkgcache-shard.cfg"


def _find(name: str) -> Optional[str]:
    # Debian puts both in /usr/sbin, which a non-root PATH may not have.
    return shutil.which(name) or next(
        (path for path in (f"/usr/sbin/{name}",) if os.access(path, os.X_OK)), None
    )


NGINX = _find("nginx")
HAPROXY = _find("haproxy")

#: The files: small, so that rounds of thousands of requests stay quick.
FILES = 100
SIZE = 20 * 1024
#: Clients asking for every file, each on a keep-alive connection of its own,
#: in an order of its own.
CLIENTS = 20

#: The recipes' example node addresses, replaced by the test nodes'; the
#: fourth is the test's, for a node that joins.
RECIPE_NODES = ("192.0.2.11:4000", "192.0.2.12:4000", "192.0.2.13:4000", "192.0.2.14:4000")


def substitute(text: str, pattern: str, replacement: str, where: Path) -> str:
    """Replace the one line of ``text`` that ``pattern`` matches: a recipe
    whose shape changed must fail here, not be tested half-substituted."""
    result, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert count == 1, f"{where}: expected one line matching {pattern!r}, found {count}"
    return result


def with_nodes(text: str, nodes: list["Node"], where: Path) -> str:
    """The recipe's example node addresses replaced by the nodes', and for a
    fourth node the line of the third one copied, as a user would add it."""
    if len(nodes) == 4:
        third = re.search(rf"^.*\s{re.escape(RECIPE_NODES[2])}[\s;].*\n", text, re.MULTILINE)
        assert third, f"{where}: no line for {RECIPE_NODES[2]}"
        fourth = third.group(0).replace(RECIPE_NODES[2], RECIPE_NODES[3])
        fourth = fourth.replace("node3", "node4").replace(" id 3", " id 4")
        text = text[:third.end()] + fourth + text[third.end():]
    for example, node in zip(RECIPE_NODES, nodes):
        text = substitute(text, rf"(?<=\s){re.escape(example)}(?=[\s;])",
                          f"127.0.0.1:{node.port}", where)
    return text


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- nodes ----------------------------------------------------------------------


class Node:
    """A ``twist pkgcache`` on 127.0.0.1, on a port and cache directory that
    stay its own across restarts."""

    #: An access log line: the path, the status and the outcome.
    LINE = re.compile(r'"GET (\S+) HTTP/1\.1" (\d+) \d+ "[^"]*" "[^"]*" (\S+)$')

    def __init__(self, processes: Processes, name: str, source: str,
                 options: tuple[str, ...] = ()) -> None:
        self.processes = processes
        self.name = name
        self.source = source
        #: More command-line options (``--node-name NAME``...).
        self.options = options
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cache = processes.directory / name / "cache"
        self.access_log = processes.directory / name / "access.log"
        self.cache.mkdir(parents=True)
        self.process = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.process = self.processes.start(
            [str(TWIST), "--log-format=text", "pkgcache",
             "--listen", f"tcp:{self.port}:interface=127.0.0.1",
             "--source", self.source, "--cache-dir", str(self.cache),
             "--access-log", str(self.access_log), *self.options],
            f"{self.name}-{self.starts}.log",
            # Its log as it goes, so that a SIGKILL loses none of it.
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    async def ready(self, http) -> None:
        await answering(http, self.url, self.process, self.name)

    def kill(self) -> None:
        """SIGKILL, to the process and its session."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=15)

    def holds(self, path: str) -> bool:
        return (self.cache / path.lstrip("/")).exists()

    def requests(self, since: int = 0) -> list[tuple[str, int, str]]:
        """``(path, status, outcome)`` of each request in the access log,
        from byte ``since`` on (the log is written in whole lines), but the
        probes of whether it answers (``/``).  (The health URL is not
        logged.)"""
        try:
            with self.access_log.open("rb") as log:
                log.seek(since)
                lines = log.read().decode().splitlines()
        except FileNotFoundError:
            return []
        found = []
        for line in lines:
            match = self.LINE.search(line)
            assert match, f"{self.name}: {line}"
            if match.group(1) != "/":
                found.append((match.group(1), int(match.group(2)), match.group(3)))
        return found

    def served(self, since: int = 0) -> list[tuple[str, str]]:
        """``(path, outcome)`` of each request in the access log, from byte
        ``since`` on, every one of which must have been a 200."""
        served = []
        for path, status, outcome in self.requests(since):
            assert status == 200, f"{self.name}: {path} {status} {outcome}"
            served.append((path, outcome))
        return served

    def log_size(self) -> int:
        try:
            return self.access_log.stat().st_size
        except FileNotFoundError:
            return 0


async def answering(http, url: str, process, what: str, timeout: float = 30) -> None:
    """Wait until ``url`` answers HTTP (with any status)."""
    deadline = reactor.seconds() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited ({process.returncode}):\n"
                                 f"{process.log_path.read_text(errors='replace')}")
        try:
            await within(5, fetch(http, url + "/"), f"{what} accepted but did not answer")
            return
        except (ConnectError, ResponseNeverReceived, ResponseFailed, AssertionError) as error:
            last = error
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what} did not answer on {url} in {timeout} s: {last!r}")
        await sleep(0.05)


async def wait_until(condition, timeout: float, what: str) -> None:
    """Poll ``condition`` on the reactor until it holds."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await sleep(0.02)


# -- balancers ------------------------------------------------------------------


class Nginx:
    """The nginx recipe, included in a main configuration as Debian's
    /etc/nginx/nginx.conf includes conf.d/*.conf (two workers, so that their
    shared view of a failed node is tested too)."""

    name = "nginx"

    MAIN = """\
{user}
worker_processes 2;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;
    include {dir}/pkgcache-shard.conf;
}}
"""

    def __init__(self, processes: Processes, nodes: list[Node]) -> None:
        self.processes = processes
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = processes.directory / "nginx"
        self.dir.mkdir()
        self.render(nodes)
        # As root, nginx's workers would be nobody, who cannot reach the
        # test's directory.
        user = "user root;" if os.geteuid() == 0 else ""
        (self.dir / "nginx.conf").write_text(self.MAIN.format(dir=self.dir, user=user))
        self.argv = [NGINX, "-p", str(self.dir), "-e", str(self.dir / "error.log"),
                     "-c", str(self.dir / "nginx.conf")]

    def render(self, nodes: list[Node]) -> None:
        recipe = with_nodes(NGINX_RECIPE.read_text(), nodes, NGINX_RECIPE)
        recipe = substitute(recipe, r"^(\s*)listen 4000;$", rf"\1listen 127.0.0.1:{self.port};",
                            NGINX_RECIPE)
        recipe = substitute(recipe, r"^\s*listen \[::\]:4000;\n", "", NGINX_RECIPE)
        (self.dir / "pkgcache-shard.conf").write_text(recipe)

    def check(self) -> None:
        check = self.processes.start([*self.argv, "-t", "-q"], "nginx-check.log")
        assert check.wait(timeout=30) == 0, self.processes.log(check)

    def start(self) -> None:
        self.check()
        self.process = self.processes.start(self.argv, "nginx.log")

    async def reconfigure(self, http, nodes: list[Node]) -> None:
        """A reload with ``nodes`` in the upstream block, as ``nginx -s
        reload`` does; done once the old workers no longer accept."""
        self.render(nodes)
        self.check()
        log = self.dir / "error.log"
        since = log.stat().st_size
        self.process.send_signal(signal.SIGHUP)

        def old_workers_gone() -> bool:
            with log.open("rb") as text:
                text.seek(since)
                return text.read().count(b"gracefully shutting down") >= 2  # 2 workers

        await wait_until(old_workers_gone, 30, "nginx's old workers to stop accepting")

    async def ready(self, http) -> None:
        await answering(http, self.url, self.process, self.name)

    def marked_down(self, node: Node) -> bool:
        """nginx OSS has no status page: its error log says when a node
        failed max_fails times and is left alone for fail_timeout."""
        log = (self.dir / "error.log").read_text(errors="replace")
        return re.search(
            rf'upstream server temporarily disabled .* upstream: "http://{node.url[7:]}/', log
        ) is not None

    async def taken_back(self, http, node: Node, files: dict[str, bytes], path: str) -> None:
        """
        Wait until ``node`` serves ``path`` (one of its files) again: nginx
        sends a request to a failed node once its fail_timeout is over, and
        a success puts it back.  Until then the next node answers.
        """
        since = node.log_size()
        deadline = reactor.seconds() + 30
        while not any(served == path for served, _ in node.served(since)):
            assert reactor.seconds() < deadline, f"nginx never asked {node.name} again"
            response, body = await fetch(http, self.url + path)
            assert (response.code, sha256(body)) == (200, sha256(files[path]))
            # (The node writes its access log at least once a second.)
            await sleep(0.2)


class HAProxy:
    """The HAProxy recipe, loaded after a global section as Debian's
    haproxy.cfg has one: here with the stats socket in the test's directory,
    logs on stdout, and no daemon, chroot or user."""

    name = "haproxy"

    GLOBAL = """\
global
    log stdout format raw local0
    stats socket {dir}/admin.sock mode 600 level admin
    stats timeout 30s
"""

    def __init__(self, processes: Processes, nodes: list[Node],
                 check_interval: Optional[str] = None) -> None:
        """``check_interval``: the health checks' ``inter`` instead of the
        recipe's (for a test that waits for checks to fail and pass)."""
        self.processes = processes
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = processes.directory / "haproxy"
        self.dir.mkdir()
        self.socket = self.dir / "admin.sock"
        self.check_interval = check_interval
        self.render(nodes)
        (self.dir / "global.cfg").write_text(self.GLOBAL.format(dir=self.dir))
        self.argv = [HAPROXY, "-f", str(self.dir / "global.cfg"),
                     "-f", str(self.dir / "pkgcache-shard.cfg")]

    def render(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        recipe = with_nodes(HAPROXY_RECIPE.read_text(), nodes, HAPROXY_RECIPE)
        recipe = substitute(recipe, r"^(\s*)bind :4000$", rf"\1bind 127.0.0.1:{self.port}",
                            HAPROXY_RECIPE)
        recipe = substitute(recipe, r"^\s*bind :::4000 v6only\n", "", HAPROXY_RECIPE)
        if self.check_interval is not None:
            recipe = substitute(recipe, r"(?<=\sdefault-server check inter )\S+(?= )",
                                self.check_interval, HAPROXY_RECIPE)
        (self.dir / "pkgcache-shard.cfg").write_text(recipe)

    def start(self) -> None:
        check = self.processes.start([*self.argv, "-c", "-q"], "haproxy-check.log")
        assert check.wait(timeout=30) == 0, self.processes.log(check)
        # -db: in the foreground, in the session the test kills.
        self.process = self.processes.start([*self.argv, "-db"], "haproxy.log")

    async def reconfigure(self, http, nodes: list[Node]) -> None:
        """HAProxy started again with ``nodes`` in the backend."""
        self.render(nodes)
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=15)
        self.start()
        await self.ready(http)

    async def ready(self, http) -> None:
        await answering(http, self.url, self.process, self.name)
        await wait_until(lambda: set(self.states().values()) == {"UP"}, 30,
                         "HAProxy to see every node up")

    def marked_down(self, node: Node) -> bool:
        return self.states()[node.name].startswith("DOWN")

    async def taken_back(self, http, node: Node, files: dict[str, bytes], path: str) -> None:
        """Wait until HAProxy's health check has put ``node`` back."""
        await wait_until(lambda: self.states()[node.name] == "UP", 30,
                         f"HAProxy to mark {node.name} up again")

    def states(self) -> dict[str, str]:
        """Each node's state as HAProxy's stats socket gives it (UP, DOWN,
        "DOWN 1/2" while going up...), by node name."""
        return {name: row["status"] for name, row in self.stats().items()}

    def stats(self) -> dict[str, dict[str, str]]:
        """Each node's line of ``show stat`` (``status``, ``check_status``,
        ``check_code``...), by node name."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stats:
            stats.settimeout(5)
            stats.connect(str(self.socket))
            stats.sendall(b"show stat\n")
            answer = b"".join(iter(lambda: stats.recv(65536), b"")).decode()
        lines = answer.splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
        by_server = {row["svname"]: row for row in rows if row["pxname"] == "pkgcache"
                     and row["svname"] not in ("FRONTEND", "BACKEND")}
        return {node.name: by_server[f"node{index}"] for index, node in
                enumerate(self.nodes, 1)}


BALANCERS = [
    pytest.param(Nginx, id="nginx", marks=pytest.mark.skipif(
        NGINX is None, reason="nginx is not installed (Debian package: nginx)")),
    pytest.param(HAProxy, id="haproxy", marks=pytest.mark.skipif(
        HAPROXY is None, reason="haproxy is not installed (Debian package: haproxy)")),
]


# -- clients --------------------------------------------------------------------


async def clients_get_everything(url: str, files: dict[str, bytes], clients: int,
                                 seed: int, queries: bool = False, timeout: float = 60,
                                 seen: Optional[list] = None) -> None:
    """
    ``clients`` clients at once, each on a keep-alive connection of its own
    (Twisted's own retry of a request on a connection that was closed is
    off: the balancer must do the failing over), each GETs every file in an
    order of its own, and checks every status and body.  With ``queries``,
    every other client adds a query string of its own to each URL (which
    pkgcache ignores: the file is the same).  With ``seen``, the ``(path,
    response headers)`` of every answer are appended to it.
    """
    async def client(number: int) -> None:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 1
        pool.retryAutomatically = False
        agent = Agent(reactor, pool=pool, connectTimeout=10)
        order = sorted(files)
        random.Random(seed * 1000 + number).shuffle(order)
        query = f"?client={number}" if queries and number % 2 else ""
        try:
            for path in order:
                response = await agent.request(b"GET", (url + path + query).encode("ascii"))
                body = await readBody(response)
                assert response.code == 200, (path, response.code, body[:300])
                assert sha256(body) == sha256(files[path]), f"{path}: a wrong body"
                if seen is not None:
                    seen.append((path, response.headers))
        finally:
            await pool.closeCachedConnections()

    everyone = DeferredList([Deferred.fromCoroutine(client(n)) for n in range(clients)],
                            consumeErrors=True)
    results = await within(timeout, everyone, f"{clients} clients did not finish in {timeout} s")
    for success, result in results:
        if not success:
            result.raiseException()


async def behind_a_balancer(processes: Processes, http, nodes: list[Node], balancer_class,
                            **options):
    """Start ``nodes``, then ``balancer_class`` in front of them; it, once
    everything answers."""
    for node in nodes:
        node.start()
    for node in nodes:
        await node.ready(http)
    balancer = balancer_class(processes, nodes, **options)
    balancer.start()
    await balancer.ready(http)
    return balancer


# -- the test -------------------------------------------------------------------


@pytest.mark.parametrize("balancer_class", BALANCERS)
@pytest_twisted.ensureDeferred
async def test_nodes_behind_the_shipped_recipe(balancer_class, origin, processes, http):
    files = {f"/dist/f-{index:03d}.bin": os.urandom(SIZE) for index in range(FILES)}
    for path, data in files.items():
        origin.add(path, data)
    nodes = [Node(processes, f"node-{index}", origin.url) for index in (1, 2, 3)]
    balancer = await behind_a_balancer(processes, http, nodes, balancer_class)

    # -- a download streams through the balancer: the client has its first
    # bytes while the origin still holds back the rest.
    big = os.urandom(3_000_000)
    gate = Gate()
    origin.add("/dist/big.iso", big, gate=gate, pause_at=300_000)
    _, reader = await start_reading(http, balancer.url + "/dist/big.iso")
    await within(10, reader.first_byte, f"{balancer.name} held back the first bytes")
    # (first_byte fires before the reader counts them.)
    await wait_until(lambda: reader.received > 0 and gate.reached == 1, 10,
                     "the first bytes, and the origin holding back the rest")
    assert reader.received <= 300_000 and not reader.done.called
    gate.open()
    assert sha256(await within(30, reader.done, "the big file did not come")) == sha256(big)

    def holders(path: str) -> list[Node]:
        return [node for node in nodes if node.holds(path)]

    def downloads(paths) -> dict[str, int]:
        return {path: origin.count(path) for path in paths}

    # -- every client asks for every file: one download of each, cluster-wide
    # (with or without a query string).
    await clients_get_everything(balancer.url, files, CLIENTS, seed=1, queries=True)
    assert downloads(files) == {path: 1 for path in files}
    # (A client may have its body a moment before the node publishes it.)
    await wait_until(lambda: all(holders(path) for path in files), 10, "every file published")
    owner = {path: holders(path) for path in files}
    assert all(len(held) == 1 for held in owner.values()), \
        {path: [node.name for node in held] for path, held in owner.items() if len(held) > 1}
    owner = {path: held[0] for path, held in owner.items()}
    shares = {node.name: sum(1 for path in files if owner[path] is node) for node in nodes}
    assert all(shares.values()), f"a node got no file at all: {shares}"

    # -- one node dies.  Clients still get every file; its files are each
    # downloaded once more, by one new owner; no other file moves.
    victim = max(nodes, key=lambda node: shares[node.name])
    survivors = [node for node in nodes if node is not victim]
    moved = sorted(path for path in files if owner[path] is victim)
    stayed = sorted(path for path in files if owner[path] is not victim)
    victim.kill()
    await clients_get_everything(balancer.url, files, CLIENTS, seed=2)
    # HAProxy by its first refused connection (or else by its health check),
    # nginx by max_fails refused connections, each retried on the next node.
    await wait_until(lambda: balancer.marked_down(victim), 30,
                     f"{balancer.name} to take {victim.name} out")
    # Where its files went while the balancer found out is where they stay.
    await clients_get_everything(balancer.url, files, 5, seed=3)
    assert downloads(stayed) == {path: 1 for path in stayed}
    assert downloads(moved) == {path: 2 for path in moved}
    # (The dead node's files are still on its disk.)
    await wait_until(lambda: all(len(holders(path)) == 2 for path in moved), 10,
                     "every moved file published by its new owner")
    for path in stayed:
        assert holders(path) == [owner[path]], path
    for path in moved:
        assert len([node for node in holders(path) if node in survivors]) == 1, path

    # -- it comes back, on its port and cache directory: its files come back
    # to it, served from its cache.
    victim.start()
    await victim.ready(http)
    await balancer.taken_back(http, victim, files, moved[0])
    since = victim.log_size()
    back = 5
    await clients_get_everything(balancer.url, files, back, seed=4)
    assert downloads(stayed) == {path: 1 for path in stayed}
    assert downloads(moved) == {path: 2 for path in moved}

    def served_by_victim() -> list[tuple[str, str]]:
        return [entry for entry in victim.served(since) if entry[0] in moved]

    await wait_until(lambda: len(served_by_victim()) >= back * len(moved), 10,
                     f"{victim.name}'s access log to show its files served")
    served = served_by_victim()
    assert sorted(served) == sorted((path, "hit") for path in moved for _ in range(back))
    assert not [path for path, _ in victim.served(since) if path not in moved], \
        f"{victim.name} served files that are not its own"

    # -- a fourth node joins (its line added to the recipe, the balancer
    # reloaded): it takes a share of the files, each downloaded once more,
    # by it; no other file moves.
    before = downloads(files)
    joining = Node(processes, "node-4", origin.url)
    joining.start()
    await joining.ready(http)
    nodes.append(joining)
    await balancer.reconfigure(http, nodes)
    held_before = {path: holders(path) for path in files}
    await clients_get_everything(balancer.url, files, back, seed=5)
    taken = sorted(path for path in files if downloads([path])[path] != before[path])
    assert taken, "the new node got no file"
    assert downloads(taken) == {path: before[path] + 1 for path in taken}
    await wait_until(lambda: all(holders(path) != held_before[path] for path in taken), 10,
                     "every file downloaded again published")
    assert {path: [node.name for node in holders(path) if node not in held_before[path]]
            for path in taken} == {path: [joining.name] for path in taken}
    assert sorted(path for path in files if joining.holds(path)) == taken


# -- a node that cannot store files -----------------------------------------------

#: Fewer files and clients than above: what matters here is where each
#: file goes, and this keeps each test at a few seconds.
SICK_FILES = 60
SICK_CLIENTS = 8
HEALTH = "/.pkgcache-health"


def break_cache(node: Node) -> Path:
    """
    Make ``node``'s cache directory unable to take a file, as a full or
    broken disk is, while the node keeps running: its spool directory
    replaced by a regular file.  (The tests run as root, whom no permission
    stops; no new file can be made under a regular file, by anyone.)  The
    files it already holds are left alone.
    """
    spool = node.cache / ".pkgcache-spool"
    shutil.rmtree(spool)
    spool.write_bytes(b"")
    return spool


def mend_cache(spool: Path) -> None:
    spool.unlink()
    spool.mkdir()


async def health(http, node: Node) -> tuple[int, bytes]:
    response, body = await within(10, fetch(http, node.url + HEALTH),
                                  f"{node.name}'s health URL did not answer")
    return response.code, body


async def three_nodes_with_their_files(processes, origin, http, balancer_class, **options):
    """Three nodes behind ``balancer_class``, every file fetched once
    through it: ``(nodes, balancer, files, owner)``, ``owner`` giving the
    node that holds each file."""
    files = {f"/dist/h-{index:03d}.bin": os.urandom(SIZE) for index in range(SICK_FILES)}
    for path, data in files.items():
        origin.add(path, data)
    nodes = [Node(processes, f"node-{index}", origin.url) for index in (1, 2, 3)]
    balancer = await behind_a_balancer(processes, http, nodes, balancer_class, **options)
    await clients_get_everything(balancer.url, files, SICK_CLIENTS, seed=11)
    assert {path: origin.count(path) for path in files} == {path: 1 for path in files}
    await wait_until(lambda: all(any(node.holds(path) for node in nodes) for path in files),
                     10, "every file published")
    owner = {}
    for path in files:
        (owner[path],) = [node for node in nodes if node.holds(path)]
    shares = {node.name: sum(1 for path in files if owner[path] is node) for node in nodes}
    assert all(shares.values()), f"a node got no file at all: {shares}"
    # Every line of this round in each node's access log (written within a
    # second), so that the lines read from now on are later requests'.
    for node in nodes:
        mine = shares[node.name] * SICK_CLIENTS
        await wait_until(lambda: len(node.served()) == mine, 10,
                         f"{node.name}'s access log to show its {mine} answers")
    return nodes, balancer, files, owner


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (Debian package: haproxy)")
@pytest_twisted.ensureDeferred
async def test_haproxy_takes_out_a_node_whose_health_url_says_503(origin, processes, http):
    """
    One of three nodes stays up, but its cache directory cannot take a
    file: its health URL says 503, HAProxy's check (``option httpchk`` on
    ``/.pkgcache-health``) takes it out, only its files move (each
    downloaded once more, by one other node), and clients get every file.
    Once its cache directory takes files again, the check puts it back and
    its files come back to it, from its cache.

    The recipe's checks are every 2 s, 2 failures to take a node out and 2
    successes to put it back (4 to 6 s each way); here they are every
    100 ms (the one change to the recipe but its addresses), with ``fall``
    and ``rise`` as shipped, to keep the test at a few seconds.
    """
    nodes, balancer, files, owner = await three_nodes_with_their_files(
        processes, origin, http, HAProxy, check_interval="100ms")
    sick = max(nodes, key=lambda node: sum(1 for path in files if owner[path] is node))
    others = [node for node in nodes if node is not sick]
    moved = sorted(path for path in files if owner[path] is sick)
    stayed = sorted(path for path in files if owner[path] is not sick)

    def downloads(paths) -> dict[str, int]:
        return {path: origin.count(path) for path in paths}

    spool = break_cache(sick)
    status, body = await health(http, sick)
    assert status == 503 and b"the cache directory cannot take files" in body, body
    for node in others:
        assert await health(http, node) == (200, b"ok\n")
    await wait_until(lambda: balancer.marked_down(sick), 10,
                     f"HAProxy to take {sick.name} out")
    # By its health check, which got a 503 (not by a failed connection).
    checked = balancer.stats()[sick.name]
    assert (checked["check_status"], checked["check_code"]) == ("L7STS", "503"), checked
    assert {node.name: balancer.states()[node.name] for node in others} == \
        {node.name: "UP" for node in others}

    since = sick.log_size()
    await clients_get_everything(balancer.url, files, SICK_CLIENTS, seed=12)
    assert downloads(stayed) == {path: 1 for path in stayed}
    assert downloads(moved) == {path: 2 for path in moved}
    await wait_until(lambda: all(any(node.holds(path) for node in others) for path in moved),
                     10, "every moved file published by its new owner")
    for path in stayed:
        assert [node for node in nodes if node.holds(path)] == [owner[path]], path
    for path in moved:
        assert len([node for node in others if node.holds(path)]) == 1, path

    # Its cache directory takes files again: the check puts it back, and
    # its files come back to it, served from its cache.
    mend_cache(spool)
    assert await health(http, sick) == (200, b"ok\n")
    await balancer.taken_back(http, sick, files, moved[0])
    await clients_get_everything(balancer.url, files, SICK_CLIENTS, seed=13)
    assert downloads(stayed) == {path: 1 for path in stayed}
    assert downloads(moved) == {path: 2 for path in moved}
    # Its access log from when it was taken out: nothing while it was out
    # (a line of then would come before those of now), then every request
    # for its files, each a hit.
    expected = sorted((path, "hit") for path in moved for _ in range(SICK_CLIENTS))
    await wait_until(lambda: len(sick.served(since)) >= len(expected), 10,
                     f"{sick.name}'s access log to show its files served")
    assert sorted(sick.served(since)) == expected


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian package: nginx)")
@pytest_twisted.ensureDeferred
async def test_nginx_keeps_a_node_whose_health_url_says_503(origin, processes, http):
    """
    nginx open source has no active health check (NGINX Plus's
    ``health_check`` has), so the nginx recipe cannot poll
    ``/.pkgcache-health``: it takes a node out only when requests to it
    fail (a refused or timed-out connection, or a 503 while it shuts down:
    ``max_fails``, ``proxy_next_upstream error timeout http_503``).  A node
    whose cache directory cannot take a file answers every request all the
    same (its files from its cache, the others streamed from the source
    uncached), so nginx keeps it, and it keeps its share of the paths:
    clients get every file, its files stay where they are, and each request
    for one of its paths that it does not hold is an origin download, every
    time, until its cache directory takes files again; from then on it
    stores them as before.
    """
    nodes, balancer, files, owner = await three_nodes_with_their_files(
        processes, origin, http, Nginx)
    sick = max(nodes, key=lambda node: sum(1 for path in files if owner[path] is node))
    spool = break_cache(sick)
    status, _ = await health(http, sick)
    assert status == 503
    since = sick.log_size()
    # A new file of its share, found by asking for new files one by one
    # (nginx hashes $uri: which node a path goes to shows only once asked).
    extra = None
    for index in range(100):
        path = f"/dist/new-{index:03d}.bin"
        origin.add(path, os.urandom(SIZE))
        response, body = await fetch(http, balancer.url + path)
        assert response.code == 200 and sha256(body) == sha256(origin.origin.files[path].data)
        (status,) = response.headers.getRawHeaders(b"cache-status")
        if status.partition(b"; ")[2] == b"fwd=miss; fwd-status=200":
            extra = path  # not "stored": streamed uncached
            break
    assert extra, f"no new path went to {sick.name}"
    files[extra] = origin.origin.files[extra].data

    rounds = 2
    for seed in range(rounds):
        await clients_get_everything(balancer.url, files, SICK_CLIENTS, seed=20 + seed)
    assert not balancer.marked_down(sick)
    assert {path: origin.count(path) for path in files if path != extra} == \
        {path: 1 for path in files if path != extra}
    assert not any(node.holds(extra) for node in nodes)
    # Every request for its files and for the new one went to it: its
    # files hits, the new one a download for each request (but those that
    # came while one was under way, which share it: "coalesced").
    mine = sorted(path for path in files if owner.get(path) is sick)
    requests = 1 + rounds * SICK_CLIENTS
    await wait_until(lambda: len(sick.served(since)) >= len(mine) * rounds * SICK_CLIENTS
                     + requests, 10, f"{sick.name}'s access log to show its files served")
    served = sick.served(since)
    assert sorted(entry for entry in served if entry[0] != extra) == \
        sorted((path, "hit") for path in mine for _ in range(rounds * SICK_CLIENTS))
    outcomes = [outcome for path, outcome in served if path == extra]
    assert len(outcomes) == requests and set(outcomes) <= {"miss", "coalesced"}, outcomes
    # At least one per round (a round starts after the last one ended), and
    # one origin request each.
    assert origin.count(extra) == outcomes.count("miss") >= 1 + rounds

    # Its cache directory takes files again: the next request stores the
    # file, and the origin is not asked for it again.
    mend_cache(spool)
    assert await health(http, sick) == (200, b"ok\n")
    before = origin.count(extra)
    await clients_get_everything(balancer.url, files, SICK_CLIENTS, seed=30)
    await wait_until(lambda: sick.holds(extra), 10, f"{sick.name} to store {extra}")
    await clients_get_everything(balancer.url, files, SICK_CLIENTS, seed=31)
    assert origin.count(extra) == before + 1
