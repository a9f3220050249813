"""
Metrics and the access log, after a known sequence of requests.
"""

from __future__ import annotations

import io
import os
import re

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import Clock
from twisted.web.client import ResponseFailed

from pkgcache.accesslog import AccessLog
from pkgcache.metrics import Metrics
from pkgcache.outcomes import Outcome
from pkgcache.service import QuietSite
from pkgcache.sources import Source
from pkgcache.upstream import UpstreamClient
from tests.clients import start_reading
from tests.conftest import fetch, raw_request, wait_for
from tests.origin import Gate, refused_url

DATA = os.urandom(200_000)


async def scrape(http, metrics: Metrics) -> dict:
    """Serve ``metrics`` on 127.0.0.1, GET /metrics, and parse the samples."""
    port = reactor.listenTCP(0, QuietSite(metrics.resource()), interface="127.0.0.1")
    try:
        response, body = await fetch(http, f"http://127.0.0.1:{port.getHost().port}/metrics")
    finally:
        await port.stopListening()
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = (sample.name,) + tuple(sorted(sample.labels.items()))
            samples[key] = sample.value
    return samples


@pytest_twisted.ensureDeferred
async def test_metrics_after_hits_misses_coalesced_errors_and_failovers(origin, make_proxy, http):
    origin.add("/a", DATA)
    # /b is held after its first bytes until the test has seen it in flight
    # with both its clients.
    gate = Gate()
    origin.add("/b", DATA, gate=gate, pause_at=50_000)
    origin.add("/broken", status=500)
    dead = refused_url()
    metrics = Metrics()
    # The dead source's back-off runs on a clock that stands still.
    upstream = UpstreamClient(
        [Source(dead), Source(origin.url)], reactor, clock=Clock(), metrics=metrics
    )
    proxy = make_proxy([], upstream=upstream, metrics=metrics)

    await fetch(http, proxy.url + "/a")  # miss, after failing over from the dead source
    await proxy.published("/a")
    await fetch(http, proxy.url + "/a")  # hit
    first, second = [await start_reading(http, proxy.url + "/b") for _ in range(2)]
    samples_during = await scrape(http, metrics)
    gate.open()
    await DeferredList([first[1].done, second[1].done], fireOnOneErrback=True)
    await fetch(http, proxy.url + "/missing")  # error: 404 everywhere
    await proxy.published("/b")
    # Every download is over (published and spool closed), not merely its file there.
    await wait_for(lambda: len(proxy.resource.downloads) == 0)

    samples = await scrape(http, metrics)
    assert samples_during[("pkgcache_downloads_in_flight",)] == 1
    assert samples[("pkgcache_downloads_in_flight",)] == 0
    outcome = lambda kind: samples[("pkgcache_requests_total", ("mirror", ""), ("outcome", kind))]  # noqa: E731
    assert (outcome("hit"), outcome("miss"), outcome("coalesced"), outcome("error")) == (1, 2, 1, 1)
    assert samples[("pkgcache_served_bytes_total", ("mirror", ""), ("origin", "cache"))] == len(DATA)
    assert samples[("pkgcache_served_bytes_total", ("mirror", ""), ("origin", "source"))] == 3 * len(DATA)
    upstream = lambda source, status: samples.get(  # noqa: E731
        ("pkgcache_upstream_requests_total", ("source", source), ("status", status)), 0
    )
    # The dead source is asked last after its first failure: for /missing,
    # which the live one did not have, as a last resort.
    assert upstream(dead, "error") == 2
    assert upstream(origin.url, "200") == 2
    assert upstream(origin.url, "404") == 1
    assert samples[("pkgcache_failovers_total",)] == 2


@pytest_twisted.ensureDeferred
async def test_metrics_are_not_in_the_mirror_url_space(origin, make_proxy, http):
    proxy = make_proxy([origin.url])
    response, _ = await fetch(http, proxy.url + "/metrics")
    assert response.code == 404
    assert origin.count("/metrics") == 1  # asked of the source, like any file


def flushed(access_log: AccessLog, stream: io.BytesIO) -> bytes:
    """What ``access_log`` wrote to ``stream``, once it flushed what waits."""
    access_log.flush()
    return stream.getvalue()


_LINE = re.compile(
    r'^(?P<host>\S+) - - \[(?P<time>[^]]+)\] "(?P<request>(?:[^"\\]|\\.)*)" (?P<status>\d{3}) '
    r'(?P<bytes>\d+|-) "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)" '
    r'(?P<outcome>\w+)(?P<dropped> dropped)?$'
)


@pytest_twisted.ensureDeferred
async def test_access_log_lines(origin, make_proxy, http):
    origin.add("/a", DATA)
    origin.add("/cut", DATA, close_at=50_000, ranges=False)
    stream = io.BytesIO()
    clock = Clock()
    clock.advance(1_600_000_000)
    access_log = AccessLog(stream, clock)
    proxy = make_proxy([origin.url], access_log=access_log)

    await fetch(http, proxy.url + "/a?x=1", headers={b"user-agent": [b'Wget "1.21"'],
                                                     b"referer": [b"http://r/"]})
    await proxy.published("/a")
    await fetch(http, proxy.url + "/a")
    await fetch(http, proxy.url + "/nothing")
    _, cut = await start_reading(http, proxy.url + "/cut")
    try:
        await cut.done
    except ResponseFailed:
        pass
    await wait_for(lambda: flushed(access_log, stream).count(b"\n") == 4)

    lines = [_LINE.match(line) for line in stream.getvalue().decode().splitlines()]
    assert all(lines), stream.getvalue()
    miss, hit, missing, dropped = (line.groupdict() for line in lines)
    assert miss == {
        "host": "127.0.0.1", "time": "13/Sep/2020:12:26:40 +0000",
        "request": "GET /a?x=1 HTTP/1.1", "status": "200", "bytes": str(len(DATA)),
        "referer": "http://r/", "agent": 'Wget \\"1.21\\"', "outcome": "miss", "dropped": None,
    }
    assert (hit["outcome"], hit["status"], hit["agent"]) == ("hit", "200", "-")
    assert (missing["outcome"], missing["status"]) == ("error", "404")
    assert (dropped["outcome"], dropped["dropped"]) == ("miss", " dropped")


@pytest_twisted.ensureDeferred
async def test_access_log_escapes_what_clients_send(origin, make_proxy):
    stream = io.BytesIO()
    access_log = AccessLog(stream, reactor)
    proxy = make_proxy([origin.url], access_log=access_log)
    await raw_request(
        proxy.url, b'GET /x HTTP/1.0\r\nUser-Agent: evil" 200 1 "-\x01\r\n\r\n'
    )
    await wait_for(lambda: flushed(access_log, stream).endswith(b"\n"))
    line = stream.getvalue().decode()
    assert '"evil\\" 200 1 \\"-\\x01"' in line
    assert line.count("\n") == 1


def test_a_finished_request_looks_its_counters_up_once():
    metrics = Metrics()
    looked_up: list = []
    for counter in (metrics.requests, metrics.served_bytes):
        labels = counter.labels
        counter.labels = lambda *values, labels=labels: looked_up.append(values) or labels(*values)
    for _ in range(3):
        metrics.request_finished("debian", Outcome.HIT, 100)
    metrics.request_finished("debian", Outcome.ERROR, 10)
    assert looked_up == [("debian", "hit"), ("debian", "cache"), ("debian", "error")]
    sample = metrics.registry.get_sample_value
    assert sample("pkgcache_requests_total", {"mirror": "debian", "outcome": "hit"}) == 3
    assert sample("pkgcache_requests_total", {"mirror": "debian", "outcome": "error"}) == 1
    assert sample("pkgcache_served_bytes_total", {"mirror": "debian", "origin": "cache"}) == 300
