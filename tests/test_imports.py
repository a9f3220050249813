"""
What a serving process imports: only what its configuration needs.

Each module a process imports stays in its memory for as long as it runs,
so the serving path of an http-only ``--source`` must not pull in the TLS
stack, the TOML parser, the cull, or the kinds of mirrors it does not
have (treq, its HTTP client to the sources, it does need).  Each case
builds the service in a fresh interpreter (from this checkout), serves a
miss and a hit through it where it can, and reports ``sys.modules``.  No
memory figures here: those are bench/'s.

Twisted itself imports pyOpenSSL along with its reactor whenever pyOpenSSL
is installed (``twisted.internet.tcp`` and ``posixbase`` try it), so in
this virtualenv ``OpenSSL`` is loaded by any process at all.  To check that
*pkgcache* needs none of it for http, the http cases run as on an install
without the TLS packages: they are made unimportable before anything is
imported, and the miss and hit must still be served.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: What Twisted's ``[tls]`` extra installs, as top-level modules.
TLS_PACKAGES = ("OpenSSL", "cryptography", "service_identity")

#: Never needed to serve http sources with --source or --mirror.
HEAVY = (
    *TLS_PACKAGES,
    "twisted.internet.ssl",
    "twisted.protocols.tls",
    "requests",
    "tomllib",
    "tomli",
    "twisted.conch",
    "pkgcache.cull",
)

#: Runs in a fresh interpreter: argv[1] is a JSON list of the packages to
#: make unimportable, argv[2] the command line (ORIGIN is replaced by the
#: in-process origin's URL; it listens on one unix socket) and argv[3] the
#: URL to fetch twice through it, if any.
SCRIPT = r"""
import json, sys

UNINSTALLED = frozenset(json.loads(sys.argv[1]))


class NotInstalled:
    # As if these packages had never been installed: nothing else changes.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in UNINSTALLED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.web.client import Agent, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site

from pkgcache.tap import Options, makeService

BODY = b"x" * 100000


class Origin(Resource):
    isLeaf = True

    def render_GET(self, request):
        return BODY


origin = reactor.listenTCP(0, Site(Origin()), interface="127.0.0.1")
origin_url = "http://127.0.0.1:%d/" % origin.getHost().port
argv = json.loads(sys.argv[2])
socket_path = argv[argv.index("--listen") + 1].partition(":")[2]
options = Options()
options.parseOptions([arg.replace("ORIGIN", origin_url) for arg in argv])
service = makeService(options, reactor)
fetch = json.loads(sys.argv[3])


class ToSocket:
    def endpointForURI(self, uri):
        return UNIXClientEndpoint(reactor, socket_path)


async def main():
    service.startService()
    try:
        for _ in range(2 if fetch else 0):
            agent = Agent.usingEndpointFactory(reactor, ToSocket())
            response = await agent.request(b"GET", fetch.encode("ascii"))
            body = await readBody(response)
            assert (response.code, body) == (200, BODY), (response.code, body[:200])
    finally:
        await service.stopService()


outcome = []
ensureDeferred(main()).addBoth(outcome.append).addBoth(lambda _: reactor.stop())
reactor.run()
if outcome[0] is not None:
    outcome[0].raiseException()
import pkgcache
print(json.dumps({"modules": sorted(sys.modules), "pkgcache": pkgcache.__file__}))
"""


def modules_of(tmp_path: Path, argv: list[str], *, fetch: str = "",
               uninstalled: tuple[str, ...] = ()) -> set[str]:
    """The modules a process built from ``argv`` has, after ``fetch`` twice."""
    # A unix socket's path has at most 107 bytes: not always room in tmp_path.
    with tempfile.TemporaryDirectory(prefix="pkgcache-") as sockets:
        listen = f"unix:{sockets}/serve.sock"
        command = [*argv, "--cache-dir", str(tmp_path / "cache"), "--listen", listen]
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT, json.dumps(list(uninstalled)), json.dumps(command),
             json.dumps(fetch)],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    # This checkout's, not an installed copy's.
    assert Path(report["pkgcache"]).parent == PROJECT_ROOT / "pkgcache"
    return set(report["modules"])


def loaded(modules: set[str], names) -> list[str]:
    """Which of ``names`` (or a module inside one) are in ``modules``."""
    return sorted(
        name for name in names
        if any(module == name or module.startswith(name + ".") for module in modules)
    )


def test_an_http_source_serves_without_anything_heavy(tmp_path: Path) -> None:
    modules = modules_of(
        tmp_path, ["--source", "ORIGIN"], fetch="http://pkgcache/some/file.tar.gz",
        uninstalled=TLS_PACKAGES,
    )
    assert loaded(modules, HEAVY) == []
    assert loaded(modules, ["pkgcache.kinds.npm", "pkgcache.kinds.pypi"]) == []
    assert "treq" in modules, "the miss went to the source through treq"


def test_a_mirror_imports_its_own_kind_only(tmp_path: Path) -> None:
    modules = modules_of(
        tmp_path,
        ["--mirror", "py:pypi=ORIGIN", "--mirror-files", "py=ORIGIN", "--mirror", "files=ORIGIN"],
        fetch="http://pkgcache/files/some/file.tar.gz",
        uninstalled=TLS_PACKAGES,
    )
    assert loaded(modules, HEAVY) == []
    assert "pkgcache.kinds.pypi" in modules
    assert "pkgcache.kinds.npm" not in modules


def test_a_config_file_is_what_loads_the_toml_parser(tmp_path: Path) -> None:
    config = tmp_path / "pkgcache.toml"
    config.write_text('[mirrors.gentoo]\nkind = "gentoo"\nsources = ["http://127.0.0.1:1/"]\n')
    modules = modules_of(tmp_path, ["--config", str(config)], uninstalled=TLS_PACKAGES)
    toml = "tomllib" if sys.version_info >= (3, 11) else "tomli"
    assert loaded(modules, HEAVY) == [toml]


def test_an_https_source_has_tls(tmp_path: Path) -> None:
    modules = modules_of(tmp_path, ["--source", "https://mirror.example/gentoo/"])
    assert loaded(modules, TLS_PACKAGES) == sorted(TLS_PACKAGES)
    assert loaded(modules, ["requests", "tomllib", "tomli", "pkgcache.cull"]) == []
