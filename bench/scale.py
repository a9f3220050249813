"""
The scale step (``bench/run --only scale``): several pkgcache nodes behind
the shipped nginx sharding recipe (``contrib/nginx/pkgcache-shard.conf``,
only its node addresses and its listen line changed), on this machine.

1. Throughput, each figure a ratio to one node asked directly, in the same
   run: (a) one node, (b) nginx in front of that one node (the cost of the
   balancer's hop), (c) nginx in front of three nodes.  Scenarios: 4 KiB
   hits under wrk over many distinct files (so that the hash spreads them
   over the nodes), and one large cached file to 1 and to 4 clients.  On a
   2-core machine three nodes cannot scale: what this shows is the hop's
   overhead.
2. Origin downloads when the nodes change, without ``--peer`` and with
   every node naming the others as peers: N files fetched through the
   balancer until each node holds its share; one node killed (its files
   move to the others); a replacement with an empty cache on its port
   (nginx takes it back); a fourth node added to the upstream block (a
   reload).  The two runs use the same node ports, so nginx's ring, and
   each node's share, is the same in both.

It uses the harness of ``bench.py`` (processes, nginx, origin, table) and
the curl clients of ``speed.py``.
"""

from __future__ import annotations

import filecmp
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Iterator

import bench as harness
import speed
from bench import MiB, Row, free_port, human

RECIPE = Path(__file__).resolve().parent.parent / "contrib" / "nginx" / "pkgcache-shard.conf"
#: The recipe's example node addresses, each on a server line of its own.
RECIPE_NODES = ("192.0.2.11:4000", "192.0.2.12:4000", "192.0.2.13:4000")
#: As Debian's nginx.conf (worker_processes auto).
BALANCER_WORKERS = os.cpu_count() or 1

#: The 4 KiB hits: this many distinct files, wrk with this many connections.
HIT_FILES = 256
HIT_CONNECTIONS = 64
#: The large cached file, at most this size (a quick run's files are smaller).
LARGE_SIZE = 256 * MiB
#: The origin downloads: this many files of this size, each fetched by
#: every one of this many clients (each in an order of its own, on one
#: keep-alive connection).
MOVED_FILES = 300
MOVED_SIZE = 64 * 1024
MOVE_CLIENTS = 4

#: The three subjects of the throughput scenarios; the first is the reference.
ONE_NODE = "(a) one node, direct"
BEHIND_NGINX = "(b) nginx in front of that node"
THREE_NODES = "(c) nginx in front of three nodes"

#: wrk asks for each of ``paths`` in turn (the requests made once per thread).
WRK_PATHS_SCRIPT = """\
paths = {{ {paths} }}
requests = {{}}
counter = 0
init = function(args)
  for i, path in ipairs(paths) do requests[i] = wrk.format("GET", path) end
end
request = function()
  counter = counter % #requests + 1
  return requests[counter]
end
"""

#: The metric of the misses a node had from a peer.
PEER_HITS = re.compile(r'^pkgcache_peer_requests_total\{[^}]*result="hit"[^}]*\} (\S+)$',
                       re.MULTILINE)


def substitute(text: str, pattern: str, replacement: str) -> str:
    """Replace the one line ``pattern`` matches: a recipe whose shape changed
    must stop the step, not be measured half-substituted."""
    result, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    if count != 1:
        raise RuntimeError(f"{RECIPE}: expected one line matching {pattern!r}, found {count}")
    return result


def render_recipe(node_ports: list[int], port: int) -> str:
    """
    The shipped recipe with a server line per node instead of its three
    examples (each the examples' line with the address changed: a fourth
    node is added, or lines dropped, as a user would), listening on
    127.0.0.1:``port`` only.
    """
    text = RECIPE.read_text()
    lines = [re.search(rf"^(.*\s){re.escape(node)}([\s;].*\n)", text, re.MULTILINE)
             for node in RECIPE_NODES]
    if (None in lines or len({(line.group(1), line.group(2)) for line in lines}) != 1
            or any(a.end() != b.start() for a, b in zip(lines, lines[1:]))):
        raise RuntimeError(f"{RECIPE}: the example server lines are not three alike, in a row")
    before, after = lines[0].group(1), lines[0].group(2)
    servers = "".join(f"{before}127.0.0.1:{node_port}{after}" for node_port in node_ports)
    text = text[:lines[0].start()] + servers + text[lines[-1].end():]
    text = substitute(text, r"^(\s*)listen 4000;$", rf"\g<1>listen 127.0.0.1:{port};")
    return substitute(text, r"^\s*listen \[::\]:4000;\n", "")


class Node:
    """
    A ``twist pkgcache`` on 127.0.0.1 at a port that stays its own: a
    replacement starts on it with an empty cache directory.  Each node has
    a name of its own (``--node-name``): on one host they would all be
    named after it, and each would refuse the others' peer requests as a
    loop (508).
    """

    def __init__(self, bench: "harness.Bench", name: str, port: int, peers: list[int]) -> None:
        self.bench = bench
        self.name = name
        self.port = port
        self.peers = peers
        self.url = f"http://127.0.0.1:{port}"
        self.starts = 0
        self.process: subprocess.Popen
        self.cache: Path
        self.metrics_port = 0

    def start(self) -> None:
        """Start with an empty cache directory (call :meth:`ready` next)."""
        self.starts += 1
        work = self.bench.work
        self.cache = work / f"{self.name}-{self.starts}"
        self.metrics_port = free_port()
        peers = [arg for peer in self.peers for arg in ("--peer", f"http://127.0.0.1:{peer}/")]
        self.process = self.bench.processes.start(
            [self.bench.args.twist, "--log-format=text", "pkgcache",
             "--source", f"http://127.0.0.1:{self.bench.origin_port}/",
             "--cache-dir", str(self.cache),
             "--listen", f"tcp:{self.port}:interface=127.0.0.1:backlog=1024",
             "--metrics-listen", f"tcp:{self.metrics_port}:interface=127.0.0.1",
             "--node-name", self.name, *peers],
            stdout=open(work / f"{self.name}-{self.starts}.log", "wb"), stderr=subprocess.STDOUT,
        )

    def ready(self) -> None:
        """Wait until the node's health URL says it serves."""
        harness.wait_for_port(self.port, self.process, self.name)
        deadline = time.monotonic() + 30
        while harness.http_get(self.port, "/.pkgcache-health").status != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: /.pkgcache-health is not 200 after 30 s")
            time.sleep(0.05)

    def stop(self) -> None:
        self.bench.stop_pkgcache(self.process, self.cache)

    def kill(self) -> None:
        """SIGKILL, and its cache directory goes with it."""
        self.bench.processes.stop(self.process, signal.SIGKILL)
        shutil.rmtree(self.cache, ignore_errors=True)

    def holds(self, label: str, directory: str) -> set[str]:
        """The names of the files published under ``/v/label/directory/``."""
        try:
            return set(os.listdir(self.cache / "v" / label / directory))
        except FileNotFoundError:
            return set()

    def downloading(self) -> bool:
        """A download is still being written (a spool exists)."""
        try:
            return any(os.scandir(self.cache / ".pkgcache-spool"))
        except FileNotFoundError:
            return False

    def peer_copies(self) -> int:
        """Misses this process has had from a peer (pkgcache_peer_requests, result hit)."""
        text = harness.http_get(self.metrics_port, "/metrics").body.decode()
        return int(sum(float(value) for value in PEER_HITS.findall(text)))


class Balancer:
    """
    nginx running the rendered recipe (included in the http block, as
    Debian's nginx.conf includes conf.d/) in front of some nodes, with an
    access log as Debian's has.
    """

    def __init__(self, bench: "harness.Bench", name: str, nodes: list[Node]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = bench.work / name
        self.recipe = bench.work / f"{name}-pkgcache-shard.conf"
        self.recipe.write_text(render_recipe([node.port for node in nodes], self.port))
        self.process = harness.start_nginx(
            bench.processes, self.dir,
            f"    access_log {self.dir}/access.log;\n    include {self.recipe};\n",
            [self.port], workers=BALANCER_WORKERS,
        )

    def reload(self, nodes: list[Node]) -> None:
        """``nodes`` in the upstream block and ``nginx -s reload``; done once
        the old workers have exited (they no longer accept)."""
        old = set(harness.nginx_workers(self.process))
        self.recipe.write_text(render_recipe([node.port for node in nodes], self.port))
        check = subprocess.run(
            ["nginx", "-t", "-q", "-p", str(self.dir), "-e", str(self.dir / "error.log"),
             "-c", str(self.dir / "nginx.conf")], capture_output=True, text=True,
        )
        if check.returncode != 0:
            raise RuntimeError(f"nginx rejected {self.recipe}:\n{check.stderr}")
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while True:
            workers = set(harness.nginx_workers(self.process))
            if len(workers) == BALANCER_WORKERS and not workers & old:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx's old workers {sorted(old)} did not exit after a reload")
            time.sleep(0.05)


def fetch_all(base: str, paths: list[str], size: int, clients: int = 1) -> float:
    """Each of ``clients`` curls fetches every path (in an order of its own,
    the same every run); the wall time."""
    orders = []
    for client in range(clients):
        order = list(paths)
        if client:
            random.Random(client).shuffle(order)
        orders.append(order)
    wall, _ = speed.transfers([speed.curl([base + path for path in order]) for order in orders],
                              size)
    return wall


def wait_written(nodes: list[Node]) -> None:
    """Wait until no node is still writing a download (all are published)."""
    deadline = time.monotonic() + 60
    while any(node.downloading() for node in nodes):
        if time.monotonic() > deadline:
            raise RuntimeError("downloads still being written after 60 s")
        time.sleep(0.02)


class Scale:
    def __init__(self, bench: "harness.Bench") -> None:
        self.bench = bench
        self.sizes = bench.sizes
        self.large_size = min(LARGE_SIZE, bench.sizes.big)
        files = bench.files / "scale"
        self.hit_paths = [f"/v/scale-hits/scale/small/{i:03d}.bin" for i in range(HIT_FILES)]
        self.large_path = "/v/scale-large/scale/large.bin"
        self.moved_paths = [f"/v/scale-moves/scale/moved/{i:03d}.bin" for i in range(MOVED_FILES)]
        for directory, count, size in (("small", HIT_FILES, self.sizes.small),
                                       ("moved", MOVED_FILES, MOVED_SIZE)):
            (files / directory).mkdir(parents=True)
            for index in range(count):
                (files / directory / f"{index:03d}.bin").write_bytes(os.urandom(size))
        with open(files / "large.bin", "wb") as out:
            for _ in range(self.large_size // (16 * MiB)):
                out.write(os.urandom(16 * MiB))
        os.sync()

    def origin_downloads(self, label: str) -> int:
        time.sleep(0.1)  # the origin logs a request once it is done
        return self.bench.upstream_requests(label)

    # throughput

    def rounds(self, subjects: dict[str, str]) -> Iterator[tuple[int, str, str]]:
        """``(round, subject, base URL)``, each round starting with another subject."""
        names = list(subjects)
        for rep in range(self.sizes.repeats):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                yield rep, name, subjects[name]

    def add_against_one_node(self, section: str, what: str, values: dict[str, list[float]],
                             unit: str) -> None:
        """A row per subject (its median, against the one node's), then each
        subject against the one node round by round (``values`` are in round
        order): on a shared machine the load drifts between rounds more
        than within one."""
        reference = values[ONE_NODE]
        for subject, samples in values.items():
            value = statistics.median(samples)
            self.bench.add(Row(section, f"{subject}: {what}", value, unit, samples=samples,
                               ratio=value / statistics.median(reference), ratio_to="of one node"))
        for subject, samples in values.items():
            if subject != ONE_NODE:
                ratios = [value / one for value, one in zip(samples, reference)]
                self.bench.add(Row(section, f"{subject[:3]} / (a), {what}, round by round",
                                   statistics.median(ratios), "x", samples=ratios))

    def throughput(self) -> None:
        bench = self.bench
        ports = [free_port() for _ in range(3)]
        nodes = [Node(bench, f"scale-node-{i + 1}", port, []) for i, port in enumerate(ports)]
        balancers: list[Balancer] = []
        for node in nodes:
            node.start()
        try:
            for node in nodes:
                node.ready()
            balancers = [Balancer(bench, "scale-nginx-one", nodes[:1]),
                         Balancer(bench, "scale-nginx-three", nodes)]
            subjects = {ONE_NODE: nodes[0].url, BEHIND_NGINX: balancers[0].url,
                        THREE_NODES: balancers[1].url}
            # Cached on the one node (all of them), and on each of the three
            # (its share: the first node's share is already there).
            for base in (nodes[0].url, balancers[1].url):
                fetch_all(base, self.hit_paths, self.sizes.small)
                fetch_all(base, [self.large_path], self.large_size)
                wait_written(nodes)
            self.bench.log("  files on each of the three nodes: " + ", ".join(
                f"{node.name} {len(node.holds('scale-hits', 'scale/small'))}" for node in nodes))
            bench.settle()
            self.small_hits(subjects)
            self.large_hits(subjects)
        finally:
            for balancer in balancers:
                bench.processes.stop(balancer.process)
            for node in nodes:
                node.stop()

    def small_hits(self, subjects: dict[str, str]) -> None:
        seconds = max(3, self.sizes.wrk_seconds // 2)
        section = (f"{human(self.sizes.small)} hits over {HIT_FILES} files "
                   f"(wrk -t2 -c{HIT_CONNECTIONS} -d{seconds}s, {self.sizes.repeats} runs each)")
        script = self.bench.work / "scale-hits.lua"
        script.write_text(WRK_PATHS_SCRIPT.format(paths=", ".join(f'"{p}"' for p in self.hit_paths))
                          + harness.WRK_SCRIPT)
        rates: dict[str, list[float]] = {subject: [] for subject in subjects}
        p99s: dict[str, list[float]] = {subject: [] for subject in subjects}
        before = self.origin_downloads("scale-hits")
        for rep, subject, base in self.rounds(subjects):
            found = harness.wrk(base + self.hit_paths[0], 2, HIT_CONNECTIONS, seconds, script)
            rates[subject].append(found["requests_per_second"])
            p99s[subject].append(found["p99_us"] / 1e6)
            self.bench.log(f"  4 KiB hits {subject} #{rep}: {found['requests_per_second']:.0f} "
                           f"req/s, p99 {found['p99_us'] / 1000:.1f} ms")
        if self.origin_downloads("scale-hits") != before:
            raise RuntimeError("4 KiB hits went to the origin")
        self.add_against_one_node(section, "req/s", rates, "req/s")
        self.add_against_one_node(section, "p99 latency", p99s, "s")

    def large_hits(self, subjects: dict[str, str]) -> None:
        size = self.large_size
        section = f"one cached {human(size)} file (on one node, wherever the hash puts it)"
        before = self.origin_downloads("scale-large")
        for clients in (1, 4):
            rates: dict[str, list[float]] = {subject: [] for subject in subjects}
            for rep, subject, base in self.rounds(subjects):
                wall = fetch_all(base, [self.large_path], size, clients)
                rates[subject].append(clients * size / wall)
                self.bench.log(f"  {human(size)} hit x{clients} {subject} #{rep}: {wall:.3f} s")
            self.add_against_one_node(section, f"throughput, {clients} client{'s' * (clients > 1)}",
                                      rates, "B/s")
        if self.origin_downloads("scale-large") != before:
            raise RuntimeError(f"{human(size)} hits went to the origin")

    # origin downloads when nodes change

    def moves(self, ports: list[int], with_peers: bool) -> dict[str, dict[str, float]]:
        """
        The stages, with or without ``--peer`` (each of the first three
        nodes naming the other two; the fourth, the three).  For each stage:
        the origin downloads it made, the files copied from a peer and the
        clients' time; and the shares of the nodes (the files each holds
        once it took them).
        """
        bench = self.bench
        label, directory = "scale-moves", "scale/moved"
        names = ["node-a", "node-b", "node-c", "node-d"]
        nodes = [
            Node(bench, f"scale-{'peer' if with_peers else 'nopeer'}-{name}", port,
                 [p for p in ports[:3] if p != port] if with_peers else [])
            for name, port in zip(names, ports)
        ]
        first, replaced, joining = nodes[:3], nodes[1], nodes[3]
        running: list[Node] = []
        balancer = None
        stages: dict[str, dict[str, float]] = {}

        def stage(name: str, change) -> dict[str, float]:
            """Apply ``change``, then every client fetches every file; count."""
            origin_before = self.origin_downloads(label)
            copies_before = {node.name: node.peer_copies() for node in running}
            change()
            wall = fetch_all(balancer.url, self.moved_paths, MOVED_SIZE, MOVE_CLIENTS)
            wait_written(running)
            self.verify(running, label, directory)
            found = {
                "origin": self.origin_downloads(label) - origin_before,
                "copies": sum(node.peer_copies() - copies_before.get(node.name, 0)
                              for node in running),
                "seconds": wall,
            }
            stages[name] = found
            bench.log(f"  {'with' if with_peers else 'without'} --peer, {name}: "
                      f"{found['origin']} origin downloads, {found['copies']} peer copies, "
                      f"{wall:.2f} s; held: " + ", ".join(
                          f"{node.name[-6:]} {len(node.holds(label, directory))}"
                          for node in running))
            return found

        def kill_replaced() -> None:
            replaced.kill()
            running.remove(replaced)

        def bring_back_replaced() -> None:
            replaced.start()
            running.insert(1, replaced)
            replaced.ready()
            self.taken_back(balancer, replaced, share["node-b"], label, directory)

        def add_joining() -> None:
            joining.start()
            running.append(joining)
            joining.ready()
            balancer.reload(nodes)

        try:
            for node in first:
                node.start()
                running.append(node)
            for node in first:
                node.ready()
            balancer = Balancer(bench, f"scale-nginx-{'peer' if with_peers else 'nopeer'}", first)
            stage("fill", lambda: None)
            share = {name: node.holds(label, directory) for name, node in zip(names, first)}
            stages["fill"].update({f"share {name}": len(held) for name, held in share.items()})
            if sum(len(held) for held in share.values()) != MOVED_FILES:
                raise RuntimeError(f"after the fill the nodes hold "
                                   f"{sum(len(held) for held in share.values())} files, "
                                   f"not {MOVED_FILES} (a file on two nodes, or on none)")
            stage("away", kill_replaced)
            stage("back", bring_back_replaced)
            stage("join", add_joining)
            stages["join"]["share node-d"] = len(joining.holds(label, directory))
        finally:
            if balancer is not None:
                bench.processes.stop(balancer.process)
            for node in running:
                node.stop()
        return stages

    def taken_back(self, balancer: Balancer, node: Node, share: set[str], label: str,
                   directory: str) -> None:
        """
        Wait until nginx sends ``node`` its paths again: it asks a node it
        found down once its fail_timeout (10 s) is over, and a success puts
        it back.  Until then one of the node's files (the probe) is fetched
        through the balancer, and the next node on the ring answers.
        """
        probe = sorted(share)[0]
        deadline = time.monotonic() + 60
        while probe not in node.holds(label, directory):
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not send {node.name} its files within 60 s")
            fetch_all(balancer.url, [f"/v/{label}/{directory}/{probe}"], MOVED_SIZE)
            wait_written([node])
            time.sleep(0.2)

    def verify(self, nodes: list[Node], label: str, directory: str) -> None:
        """Every copy a node holds is the origin's file, byte for byte."""
        origin = self.bench.files / "scale" / "moved"
        for node in nodes:
            for name in node.holds(label, directory):
                if not filecmp.cmp(node.cache / "v" / label / directory / name, origin / name,
                                   shallow=False):
                    raise RuntimeError(f"{node.name} holds a {name} that is not the origin's")

    def origin_table(self) -> None:
        ports = [free_port() for _ in range(4)]
        alone = self.moves(ports, with_peers=False)
        peers = self.moves(ports, with_peers=True)
        self.bench.extra["scale_moves"] = {"without_peer": alone, "with_peer": peers}
        section = (f"origin downloads, {MOVED_FILES} x {human(MOVED_SIZE)} files, "
                   f"{MOVE_CLIENTS} clients each fetching all of them through nginx, "
                   f"per stage")
        share_b = alone["fill"]["share node-b"]
        share_d = alone["join"]["share node-d"]
        if (peers["fill"]["share node-b"], peers["join"]["share node-d"]) != (share_b, share_d):
            raise RuntimeError("the same ports gave other shares with --peer: the ring changed")
        for name in ("node-a", "node-b", "node-c"):
            self.bench.add(Row(section, f"{name}'s share after the fill",
                               alone["fill"][f"share {name}"], "requests"))
        self.bench.add(Row(section, "node-d's share once it joins", share_d, "requests"))
        stages = (
            ("fill", "fill: 3 nodes, empty", MOVED_FILES, MOVED_FILES),
            ("away", "node-b killed (SIGKILL): its files move", share_b, share_b),
            ("back", "node-b replaced: empty cache, same port, taken back", share_b, 0),
            ("join", "node-d joins (4th server line, nginx reload)", share_d, 0),
        )
        for name, what, expected_alone, expected_peers in stages:
            self.bench.add(Row(section, f"{what}: without --peer", alone[name]["origin"],
                               "requests", target=f"{expected_alone}",
                               met=alone[name]["origin"] == expected_alone))
            self.bench.add(Row(section, f"{what}: with --peer", peers[name]["origin"],
                               "requests", target=f"{expected_peers}",
                               met=peers[name]["origin"] == expected_peers))
            self.bench.add(Row(section, f"{what}: with --peer, copied from a peer",
                               peers[name]["copies"], "requests"))
        section = (f"time for the {MOVE_CLIENTS} clients to fetch the {MOVED_FILES} files, "
                   f"per stage (peers asked first cost a round trip each)")
        for name, what, _, _ in stages:
            for mode, found in (("without --peer", alone), ("with --peer", peers)):
                self.bench.add(Row(section, f"{what}: {mode}", found[name]["seconds"], "s"))

    def run(self) -> None:
        self.bench.log(" scale: throughput, one node against nodes behind nginx")
        self.throughput()
        self.bench.log(" scale: origin downloads when nodes change, without and with --peer")
        self.origin_table()
