"""
``--workers N``: N processes serve the same listening sockets, under one
supervisor.

The supervisor is the process ``twist pkgcache`` started.  It binds every
``--listen`` endpoint itself (or takes the descriptor systemd passed for a
``systemd:`` one), never accepts on them, and starts N workers with
:meth:`~twisted.internet.interfaces.IReactorProcess.spawnProcess`, each
inheriting the sockets (``childFDs``).  A worker builds the same resource
from the same options (handed over, already checked, so that a worker
restarted after ``--config``'s file was edited still serves what the
others serve) and adopts the sockets with
:meth:`~twisted.internet.interfaces.IReactorSocket.adoptStreamPort`; the
kernel gives each connection to one of the workers that are accepting.

What must happen once is the supervisor's: the ``--max-cache-size``
culler (the workers tell it the size of each file they publish),
``--metrics-listen`` (the sum of every worker's metrics, asked for at each
scrape), restarting a worker that dies (at once, or after a growing delay
when it dies soon after it started), and on SIGTERM stopping them all
before it exits.  Every worker appends its own lines to ``--access-log``
(opened ``O_APPEND``, whole lines in each ``write``, so that lines never
mix), and reopens it when the supervisor, on SIGHUP, tells it to.

Supervisor and worker talk over two pipes (the worker's descriptors 0 and
3): first the worker's :class:`WorkerSpec`, then one JSON object a line
each way.  A worker whose supervisor is gone (its pipe closed) stops.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import stat
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet import endpoints, fdesc, tcp, unix
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, succeed
from twisted.internet.error import CannotListenError, ProcessDone, ReactorNotRunning
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from pkgcache.accesslog import AccessLog
from pkgcache.cache_limit import CacheLimit
from pkgcache.metrics import Metrics
from pkgcache.transports import serving_transports_on
from pkgcache.service import (
    CacheService, QuietSite, cannot_listen, cannot_use_cache, serving_site,
)
from pkgcache.store import CacheStore

log = Logger()

#: A worker that dies less than this many seconds after it started (or
#: before it was ready) is restarted after a delay, doubled each time it
#: does so again in a row (up to :data:`MAX_RESTART_DELAY`).
MIN_UPTIME = 5.0
FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0

#: Seconds a worker has to stop after SIGTERM before it gets SIGKILL.
STOP_TIMEOUT = 30.0

#: Seconds a scrape waits for a worker's metrics; past it, the worker's
#: previous answer is counted.
METRICS_TIMEOUT = 5.0

# A worker's descriptors.
_CONTROL_IN = 0  # supervisor -> worker
_CONTROL_OUT = 3  # worker -> supervisor
_LOG = 4  # twist's log, when it is neither 1 nor 2
_FIRST_LISTENER = 5  # then one for each --listen, in order

#: The endpoints whose sockets can be handed to workers.
SHAREABLE_ENDPOINTS = (
    endpoints.TCP4ServerEndpoint,
    endpoints.TCP6ServerEndpoint,
    endpoints.SSL4ServerEndpoint,
    endpoints.UNIXServerEndpoint,
    endpoints.AdoptedStreamServerEndpoint,
)

#: The environment systemd hands its sockets in: for the supervisor only.
_SYSTEMD_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_count(text: str) -> int:
    """
    ``--workers``' value: a whole number of at least 1, or ``auto`` for
    :func:`cpu_count`.

    :raises ValueError: for anything else.
    """
    if text.strip().lower() == "auto":
        return cpu_count()
    count = int(text)
    if count < 1:
        raise ValueError(f"{count} workers")
    return count


# --- The supervisor ---------------------------------------------------------


@dataclass(frozen=True)
class ListenerSpec:
    """One socket handed to the workers, at ``_FIRST_LISTENER + its index``."""

    description: str
    family: int
    #: Passed by systemd (``systemd:``), not bound from ``description``.
    from_systemd: bool


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker is told when it starts."""

    index: int
    #: The checked options (:class:`pkgcache.tap.Options` as a dict).
    config: dict
    listeners: tuple[ListenerSpec, ...]
    log_format: str
    log_level: str
    log_fd: int
    reactor_name: Optional[str]
    #: Tell the supervisor each published file's size (for its culler).
    report_published: bool


@dataclass
class _Listener:
    spec: ListenerSpec
    fd: int
    #: The supervisor's own port, not reading, that holds a bound socket
    #: open (and removes a unix socket's file at the end); ``None`` for a
    #: socket systemd holds.
    port: Optional[IListeningPort]


class _HeldForWorkers(Factory):
    """What the supervisor's own ports are given: they never accept."""

    def logPrefix(self) -> str:
        return "pkgcache (for the workers)"


class Supervisor(MultiService):
    """
    Runs ``config["workers"]`` worker processes on the sockets of
    ``config["listen"]``, and what there must be one of: the cache limit
    and the metrics endpoint.

    :param config: :class:`pkgcache.tap.Options`, parsed and checked.
    """

    def __init__(self, config, reactor) -> None:
        super().__init__()
        self._config = config
        self._reactor = reactor
        self.count: int = config["workers"]
        self.log_format, self.log_level, self.log_fd = _twist_logging(config)
        self._reactor_name = _twist_reactor(config)
        self._listeners: list[_Listener] = []
        self.workers = [_Worker(self, index) for index in range(self.count)]
        self.stopping = False
        self._previous_sighup: Any = None
        #: The counters of workers that died, as last read from them, so
        #: that the sums never go down.
        self._retired: list[dict] = []
        #: The supervisor's own metrics: the cache limit's, and its own.
        self.metrics = Metrics()
        self._registry = CollectorRegistry()
        self.restarts = Counter(
            "pkgcache_worker_restarts",
            "Worker processes restarted after they died.",
            registry=self._registry,
        )
        Gauge(
            "pkgcache_workers", "Worker processes running.", registry=self._registry
        ).set_function(lambda: sum(worker.running for worker in self.workers))
        self._store: Optional[CacheStore] = None
        self._cache_limit: Optional[CacheLimit] = None
        if config["max-cache-size"] is not None:
            self._store = CacheStore(config["cache-dir"], reactor)
            self._cache_limit = CacheLimit(
                self._store, config["max-cache-size"], self.metrics, reactor
            )
        if config["metrics-listen"] is not None:
            root = Resource()
            root.putChild(b"metrics", _SummedMetricsPage(self))
            strports.service(
                config["metrics-listen"], QuietSite(root), reactor=reactor
            ).setServiceParent(self)

    def startService(self) -> None:
        try:
            for description in self._config["listen"]:
                self._listeners.append(self._bind(description))
            super().startService()
        except CannotListenError as error:
            self._close_listeners()
            raise cannot_listen(error) from None
        if self._store is not None:
            try:
                self._store.open()
            except OSError as error:
                raise cannot_use_cache(self._store, error) from None
            self._cache_limit.startService()
        self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
        for worker in self.workers:
            worker.start()

    def _bind(self, description: str) -> _Listener:
        endpoint = endpoints.serverFromString(self._reactor, description)
        if isinstance(endpoint, endpoints.AdoptedStreamServerEndpoint):
            spec = ListenerSpec(description, endpoint.addressFamily, from_systemd=True)
            return _Listener(spec, endpoint.fileno, None)
        listening: list = []
        endpoint.listen(_HeldForWorkers()).addBoth(listening.append)
        # tcp, ssl and unix endpoints listen at once (tap checks that
        # only those are given).
        [port] = listening
        if isinstance(port, Failure):
            port.raiseException()
        # The workers accept; this process only keeps the socket.
        port.stopReading()
        spec = ListenerSpec(description, port.socket.family, from_systemd=False)
        return _Listener(spec, port.fileno(), port)

    def _close_listeners(self) -> "Deferred[None]":
        listeners, self._listeners = self._listeners, []
        stopped = [listener.port.stopListening() for listener in listeners if listener.port]
        stopping = DeferredList([d for d in stopped if d is not None], consumeErrors=True)
        return stopping.addCallback(lambda _: None)

    def stopService(self) -> "Deferred[None]":
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.stopping = True
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        await DeferredList([worker.stop() for worker in self.workers], consumeErrors=True)
        await self._close_listeners()
        await super().stopService()
        if self._cache_limit is not None and self._cache_limit.running:
            self._cache_limit.stopService()
            await self._store.close()

    def spec(self, index: int) -> WorkerSpec:
        return WorkerSpec(
            index=index,
            config=dict(self._config),
            listeners=tuple(listener.spec for listener in self._listeners),
            log_format=self.log_format,
            log_level=self.log_level,
            log_fd=self.log_fd if self.log_fd in (1, 2) else _LOG,
            reactor_name=self._reactor_name,
            report_published=self._cache_limit is not None,
        )

    def child_fds(self) -> dict:
        fds: dict = {_CONTROL_IN: "w", 1: 1, 2: 2, _CONTROL_OUT: "r"}
        if self.log_fd not in (1, 2):
            fds[_LOG] = self.log_fd
        for number, listener in enumerate(self._listeners, _FIRST_LISTENER):
            fds[number] = listener.fd
        return fds

    def published(self, size: int) -> None:
        """A worker published a file of ``size`` bytes."""
        if self._store is not None:
            self._store.published(size)

    def retire(self, families: list[dict]) -> None:
        """Keep the counters of a worker that died, as last read."""
        self._retired = sum_families([self._retired, counters_only(families)])

    def _sighup(self, signum, frame) -> None:
        self._reactor.callFromThread(self.reopen_access_log)

    def reopen_access_log(self) -> None:
        if self._config["access-log"] in (None, "-"):
            log.info("SIGHUP: there is no access log file to reopen")
            return
        log.info("SIGHUP: the workers reopen {path}", path=self._config["access-log"])
        for worker in self.workers:
            worker.send({"op": "reopen"})

    async def metrics_text(self) -> bytes:
        """Every worker's metrics, and the supervisor's, summed."""
        await DeferredList([worker.read_metrics() for worker in self.workers])
        snapshots = [
            registry_families(self.metrics.registry),
            registry_families(self._registry),
            self._retired,
            *(worker.last_metrics for worker in self.workers if worker.last_metrics),
        ]
        return families_text(sum_families(snapshots))


class _Worker(ProcessProtocol):
    """One worker process of a :class:`Supervisor`, started again when it dies."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self._supervisor = supervisor
        self._reactor = supervisor._reactor
        self.index = index
        self.pid: Optional[int] = None
        self.running = False
        self.ready = False
        self._started_at = 0.0
        self._quick_deaths = 0
        self._restart = None
        self._ended: Optional[Deferred] = None
        self._buffer = b""
        self._asked: dict[int, Deferred] = {}
        self._next_question = 0
        #: The metrics it last answered, as :func:`registry_families`.
        self.last_metrics: Optional[list[dict]] = None

    def start(self) -> None:
        self._restart = None
        spec = pickle.dumps(self._supervisor.spec(self.index))
        env = {name: value for name, value in os.environ.items() if name not in _SYSTEMD_VARIABLES}
        self._buffer = b""
        self.ready = False
        self._started_at = self._reactor.seconds()
        transport = self._reactor.spawnProcess(
            self, sys.executable, _worker_command(self.index), env=env,
            childFDs=self._supervisor.child_fds(),
        )
        self.running = True
        self.pid = transport.pid
        transport.writeToChild(_CONTROL_IN, b"%d\n%s" % (len(spec), spec))
        log.info("worker {index} started (pid {pid})", index=self.index, pid=self.pid)

    def send(self, message: dict) -> None:
        if self.running:
            try:
                self.transport.writeToChild(_CONTROL_IN, json.dumps(message).encode() + b"\n")
            except KeyError:
                pass  # its end of the pipe is closed already: it is dying

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                log.error("worker {index} said {line!r}", index=self.index, line=line[:200])
                continue
            self._received(message)

    def _received(self, message: dict) -> None:
        event = message.get("event")
        if event == "ready":
            self.ready = True
            log.info("worker {index} (pid {pid}) is serving", index=self.index, pid=self.pid)
        elif event == "published":
            self._supervisor.published(int(message["size"]))
        elif event == "metrics":
            asked = self._asked.pop(message["id"], None)
            self.last_metrics = message["families"]
            if asked is not None:
                asked.callback(None)

    def read_metrics(self) -> "Deferred[None]":
        """Ask for its metrics (into :attr:`last_metrics`); never fails."""
        if not (self.running and self.ready):
            return succeed(None)
        self._next_question += 1
        asked: Deferred[None] = Deferred()
        self._asked[self._next_question] = asked
        question = self._next_question
        self.send({"op": "metrics", "id": question})

        def failed(failure: Failure) -> None:
            self._asked.pop(question, None)
            if failure.check(TimeoutError):
                log.warn(
                    "worker {index} (pid {pid}) gave no metrics in {timeout} s: its last "
                    "ones are counted", index=self.index, pid=self.pid, timeout=METRICS_TIMEOUT,
                )

        return asked.addTimeout(METRICS_TIMEOUT, self._reactor).addErrback(failed)

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        if self.last_metrics:
            self._supervisor.retire(self.last_metrics)
            self.last_metrics = None
        for asked in self._asked.values():
            asked.errback(reason)
        self._asked.clear()
        how = _exit_reason(reason)
        if self._supervisor.stopping:
            log.info("worker {index} (pid {pid}) {how}", index=self.index, pid=self.pid, how=how)
            ended, self._ended = self._ended, None
            if ended is not None:
                ended.callback(None)
            return
        uptime = self._reactor.seconds() - self._started_at
        if self.ready and uptime >= MIN_UPTIME:
            self._quick_deaths = 0
            delay = 0.0
        else:
            delay = self._died_young()
        log.error(
            "worker {index} (pid {pid}) {how} after {uptime:.1f} s; restarting it"
            + (" in {delay} s" if delay else ""),
            index=self.index, pid=self.pid, how=how, uptime=uptime, delay=delay,
        )
        self._restart = self._reactor.callLater(delay, self._restarted)

    def _died_young(self) -> float:
        """One more death soon after a start: the delay before the next."""
        self._quick_deaths += 1
        return min(FIRST_RESTART_DELAY * 2 ** (self._quick_deaths - 1), MAX_RESTART_DELAY)

    def _restarted(self) -> None:
        self._supervisor.restarts.inc()
        try:
            self.start()
        except OSError as error:
            delay = self._died_young()
            log.error(
                "worker {index} could not be started: {error}; trying again in {delay} s",
                index=self.index, error=error, delay=delay,
            )
            self._restart = self._reactor.callLater(delay, self._restarted)

    def stop(self) -> "Deferred[None]":
        """SIGTERM, and SIGKILL if it has not stopped within :data:`STOP_TIMEOUT`."""
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
            self._restart = None
        if not self.running:
            return succeed(None)
        self._ended = ended = Deferred()
        self.transport.signalProcess("TERM")

        def kill(failure: Failure) -> "Deferred[None]":
            failure.trap(TimeoutError)
            log.error(
                "worker {index} (pid {pid}) did not stop in {timeout} s: killing it",
                index=self.index, pid=self.pid, timeout=STOP_TIMEOUT,
            )
            self._ended = again = Deferred()
            self.transport.signalProcess("KILL")
            return again

        return ended.addTimeout(STOP_TIMEOUT, self._reactor).addErrback(kill)


def _exit_reason(reason: Failure) -> str:
    if reason.check(ProcessDone):
        return "exited"
    value = reason.value
    if getattr(value, "signal", None):
        return f"was killed by signal {value.signal}"
    return f"exited with status {value.exitCode}"


def _worker_command(index: int) -> list[str]:
    """
    ``python -c ...`` importing :func:`main` from the copy of pkgcache this
    process runs (``-c`` would put the working directory, maybe a source
    tree, first).
    """
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        f"import sys; sys.path[:] = [{here!r}] + [p for p in sys.path if p]; "
        "from pkgcache.workers import main; main()"
    )
    return [sys.executable, "-c", code, "pkgcache-worker", str(index)]


def _twist_logging(config) -> tuple[str, str, int]:
    """
    twist's log format, level and file descriptor, for the workers to log
    as the supervisor does (text to standard output without twist).
    """
    parent = getattr(config, "parent", None) or {}
    log_format = parent.get("logFormat", "text")
    level = parent.get("logLevel")
    log_file = parent.get("logFile", sys.stdout)
    try:
        log_fd = log_file.fileno()
    except (AttributeError, OSError, ValueError):
        log_fd = 1
    return log_format, level.name if level is not None else "info", log_fd


def _twist_reactor(config) -> Optional[str]:
    parent = getattr(config, "parent", None) or {}
    name = parent.get("reactorName")
    return None if name in (None, "default") else name


class _SummedMetricsPage(Resource):
    isLeaf = True

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__()
        self._supervisor = supervisor

    def render_GET(self, request: Request):
        gone: list = []
        request.notifyFinish().addErrback(gone.append)

        def answer(body: bytes) -> None:
            if gone:
                return
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            log.failure("could not sum the workers' metrics", failure)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        Deferred.fromCoroutine(self._supervisor.metrics_text()).addCallbacks(answer, failed)
        return NOT_DONE_YET


# --- Metrics of several processes -------------------------------------------
#
# A family is a dict, as a worker sends it: {"name", "type", "help", "unit",
# "samples": [[sample name, labels, value], ...]}.


def registry_families(registry) -> list[dict]:
    """The families of a prometheus registry."""
    return [
        {
            "name": family.name,
            "type": family.type,
            "help": family.documentation,
            "unit": family.unit,
            "samples": [[s.name, s.labels, s.value] for s in family.samples],
        }
        for family in registry.collect()
    ]


def sum_families(snapshots: Iterable[Sequence[dict]]) -> list[dict]:
    """
    The families of several processes as one: samples of the same name and
    labels added up (gauges too: downloads in progress, cache size, which
    only the supervisor sets), except a counter's ``_created``, which is
    the earliest.  Families and samples keep the order first seen.
    """
    merged: dict[str, dict] = {}
    for families in snapshots:
        for family in families:
            into = merged.setdefault(family["name"], {**family, "samples": {}})["samples"]
            for name, labels, value in family["samples"]:
                key = (name, tuple(sorted(labels.items())))
                sample = into.get(key)
                if sample is None:
                    into[key] = [name, labels, value]
                elif name.endswith("_created"):
                    sample[2] = min(sample[2], value)
                else:
                    sample[2] += value
    return [{**family, "samples": list(family["samples"].values())} for family in merged.values()]


def counters_only(families: Sequence[dict]) -> list[dict]:
    """What of a dead worker's metrics still counts: its counters' totals."""
    return [
        {**family, "samples": [s for s in family["samples"] if not s[0].endswith("_created")]}
        for family in families
        if family["type"] in ("counter", "histogram", "summary")
    ]


def families_text(families: Sequence[dict]) -> bytes:
    """The Prometheus text format of ``families``."""
    metrics = []
    for family in families:
        metric = Metric(family["name"], family["help"], family["type"], family.get("unit", ""))
        for name, labels, value in family["samples"]:
            metric.add_sample(name, labels, value)
        metrics.append(metric)
    return generate_latest(_Collected(metrics))


class _Collected:
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> list[Metric]:
        return self._metrics


# --- The worker -------------------------------------------------------------


def main() -> None:
    """A worker process: run by the :class:`Supervisor`, never by hand."""
    spec: WorkerSpec = pickle.loads(_read_spec(_CONTROL_IN))
    # Ctrl-C and a terminal's hang-up reach the whole process group: the
    # supervisor alone decides (with SIGTERM, or a line to reopen the log).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if spec.reactor_name is not None:
        from twisted.application.reactors import installReactor

        installReactor(spec.reactor_name)
    from twisted.internet import reactor

    # Made before logging begins: beginning it replaces sys.stdout, which
    # an --access-log of - writes to.
    worker = WorkerService(spec, reactor)
    _begin_logging(spec)
    try:
        worker.startService()
    except BaseException as error:
        if isinstance(error, SystemExit):
            log.critical("worker {index}: {error}", index=spec.index, error=error)
        else:
            log.failure("worker {index} could not start", index=spec.index)
        # The disk threads may have started, and would keep it alive.
        os._exit(1)
    reactor.addSystemEventTrigger("before", "shutdown", worker.stopService)
    reactor.run()


def _read_spec(fd: int) -> bytes:
    """``LENGTH\\n`` then that many bytes; nothing after them is read."""
    header = b""
    while not header.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            raise SystemExit("pkgcache worker: no supervisor (run twist pkgcache --workers N)")
        header += byte
    length = int(header)
    data = b""
    while len(data) < length:
        chunk = os.read(fd, length - len(data))
        if not chunk:
            raise SystemExit("pkgcache worker: the supervisor went away")
        data += chunk
    return data


def _begin_logging(spec: WorkerSpec) -> None:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        jsonFileLogObserver,
        textFileLogObserver,
    )

    if spec.log_fd == 1:
        out = sys.stdout
    elif spec.log_fd == 2:
        out = sys.stderr
    else:
        out = open(spec.log_fd, "a", encoding="utf-8")
    observe = (jsonFileLogObserver if spec.log_format == "json" else textFileLogObserver)(out)
    tag = f"worker {spec.index}"

    def tagged(event: dict) -> None:
        # Each line says which worker wrote it.
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
        observe({**event, "log_system": f"{system}, {tag}"})

    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(
            tagged, [LogLevelFilterPredicate(LogLevel.levelWithName(spec.log_level))]
        )]
    )


class WorkerService(MultiService):
    """
    One worker: the resource of ``spec.config`` (with its store and
    downloads, without a cache limit) on the sockets the supervisor handed
    over, and the pipe to the supervisor.
    """

    def __init__(self, spec: WorkerSpec, reactor) -> None:
        super().__init__()
        # tap is the command line's: it makes the resource, here as there.
        from pkgcache.tap import make_resource, trusted_proxies

        self.spec = spec
        self.reactor = reactor
        path = spec.config["access-log"]
        self.access_log = None if path is None else AccessLog.open(
            path, reactor, trusted_proxies(spec.config)
        )
        self.resource = make_resource(spec.config, reactor, self.access_log)
        self.cache = CacheService(self.resource, None, reactor)
        self.site, self._health = serving_site(self.resource)
        self.ports: list[IListeningPort] = []
        self.channel = _SupervisorChannel(self)

    def startService(self) -> None:
        super().startService()
        try:
            self.cache.startService()
        except OSError as error:
            raise cannot_use_cache(self.resource.store, error) from None
        for number, listener in enumerate(self.spec.listeners, _FIRST_LISTENER):
            inherited = _InheritedSocket(self.reactor, number, listener.family)
            if listener.from_systemd:
                port = inherited.adopt(self.site)
            else:
                # The endpoint, parsed again here (an ssl: one loads its
                # certificate), listens through the inherited socket.
                listening: list = []
                endpoint = endpoints.serverFromString(inherited, listener.description)
                endpoint.listen(self.site).addBoth(listening.append)
                [port] = listening
                if isinstance(port, Failure):
                    port.raiseException()
            self.ports.append(serving_transports_on(port))
        from twisted.internet.stdio import StandardIO

        StandardIO(self.channel, stdin=_CONTROL_IN, stdout=_CONTROL_OUT, reactor=self.reactor)
        if self.spec.report_published:
            self.resource.store.on_published.append(
                lambda size: self.channel.send({"event": "published", "size": size})
            )
        log.info(
            "worker {index} serving {listen}", index=self.spec.index,
            listen=", ".join(listener.description for listener in self.spec.listeners),
        )
        self.channel.send({"event": "ready"})

    def stopService(self) -> "Deferred[None]":
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._health.stopping = True
        ports, self.ports = self.ports, []
        await DeferredList([port.stopListening() for port in ports], consumeErrors=True)
        await super().stopService()
        if self.access_log is not None:
            self.access_log.close()
        if self.cache.running:
            await self.cache.stopService()

    def reopen_access_log(self) -> None:
        if self.access_log is not None:
            self.access_log.reopen()

    def metrics(self) -> list[dict]:
        return registry_families(self.resource.metrics.registry)


class _SupervisorChannel(LineOnlyReceiver):
    """The worker's end of the pipes to the supervisor."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, worker: WorkerService) -> None:
        self._worker = worker
        self._lost = False

    def send(self, message: dict) -> None:
        if self.transport is not None and not self._lost:
            self.sendLine(json.dumps(message).encode())

    def lineReceived(self, line: bytes) -> None:
        message = json.loads(line)
        op = message.get("op")
        if op == "metrics":
            self.send({"event": "metrics", "id": message["id"], "families": self._worker.metrics()})
        elif op == "reopen":
            self._worker.reopen_access_log()

    def connectionLost(self, reason) -> None:
        self._lost = True
        if self._worker.running:
            log.warn("worker {index}: the supervisor is gone; stopping",
                     index=self._worker.spec.index)
            try:
                self._worker.reactor.stop()
            except ReactorNotRunning:
                pass


class _InheritedSocket:
    """
    A listening socket the supervisor handed down (descriptor ``fd``), as
    the reactor an endpoint listens with: whatever the endpoint asks for
    (``listenTCP``, ``listenSSL`` with its context factory, ``listenUNIX``)
    is made of this socket instead of a new one, as ``listenSSL`` itself
    makes TLS of a TCP port.
    """

    def __init__(self, reactor, fd: int, family: int) -> None:
        self._reactor = reactor
        self._fd = fd
        self._family = family

    def adopt(self, factory) -> IListeningPort:
        fdesc.setNonBlocking(self._fd)
        if self._family == socket.AF_UNIX:
            port = _InheritedUNIXPort._fromListeningDescriptor(self._reactor, self._fd, factory)
            path = port._bindPath
            if unix._inFilesystemNamespace(path):
                # Twisted chmods an adopted unix socket to the port's mode:
                # keep the one it has.
                port.mode = stat.S_IMODE(os.stat(path).st_mode)
            port.startListening()
        else:
            port = self._reactor.adoptStreamPort(self._fd, self._family, factory)
        # The port has a duplicate of its own.
        os.close(self._fd)
        return port

    def listenTCP(self, port, factory, backlog=50, interface="") -> IListeningPort:
        return self.adopt(factory)

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface="") -> IListeningPort:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        return self.adopt(TLSMemoryBIOFactory(contextFactory, False, factory))

    def listenUNIX(self, address, factory, backlog=50, mode=0o666, wantPID=0) -> IListeningPort:
        return self.adopt(factory)


class _InheritedUNIXPort(unix.Port):
    """
    A unix socket this worker shares: its file is the supervisor's (or
    systemd's) to remove, not this worker's when it stops.
    """

    def connectionLost(self, reason) -> None:
        tcp.Port.connectionLost(self, reason)


if __name__ == "__main__":
    main()
