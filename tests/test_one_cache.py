"""
One pkgcache for the whole LAN: a real ``twist pkgcache --config FILE``
with a debian, a gentoo, a pypi and an npm mirror on one port, in front of
local upstreams that behave like the real ones (a signed Debian
repository, a Gentoo distfiles mirror, a PyPI-like index whose wheels live
on a files host, an npm registry with absolute tarball links and scoped
packages), and the real clients of each: ``apt-get``, ``wget`` and
``curl`` (as Portage fetches distfiles), ``pip``, ``uv`` and ``npm``.

A first round of clients fills the cache.  A second round of clean clients
(no state of their own) then installs the same packages, and no upstream
sees a single request: the package files are immutable, and the indexes
are fresh (``volatile-max-age``) and, although apt and pip ask for a fresh
copy with every index request, checked recently enough
(``min-revalidation-interval``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import pytest_twisted

from tests.conftest import fetch
from tests.debian_repo import (
    SIGNING_TOOLS, Apt, DebianRepo, RepoServer, Signer, missing_tools, run,
)
from tests.npm_registry import Npm, NpmRegistryServer
from tests.npm_registry import installed_version as npm_installed_version
from tests.origin import OriginServer
from tests.pypi_index import FilesHost, PackageIndexServer, Pip, Uv, installed_version
from tests.test_twist import TwistProcess

CLIENT_TOOLS = [*SIGNING_TOOLS, "wget", "curl", "npm"]
pytestmark = pytest.mark.skipif(
    bool(missing_tools(CLIENT_TOOLS)), reason=f"needs {', '.join(missing_tools(CLIENT_TOOLS))}"
)

LAYOUT = b"[structure]\n0=filename-hash BLAKE2B 8\n1=flat\n"
DISTFILE = b"a Gentoo distfile\n" * 20000
#: Where the layout above puts ``foo-1.0.tar.gz``.
DISTFILE_PATH = (
    f"/distfiles/{hashlib.blake2b(b'foo-1.0.tar.gz').hexdigest()[:2]}/foo-1.0.tar.gz"
)


class Upstreams:
    """Every upstream of the one cache, and how many requests each has seen."""

    def __init__(self, root: Path, signer: Signer) -> None:
        self.debian = DebianRepo(root / "debian", by_hash=True, signer=signer)
        self.debian_server = RepoServer(root / "debian")
        self.gentoo = OriginServer()
        self.gentoo.add("/distfiles/layout.conf", LAYOUT, content_type=b"text/plain")
        self.gentoo.add(DISTFILE_PATH, DISTFILE)
        self.pypi = PackageIndexServer(files_host=FilesHost(), core_metadata=True)
        self.wheel = None
        self.npm = NpmRegistryServer()
        self.npm_releases = []

    async def publish(self) -> None:
        await self.debian.add_package("hello", "1.0")
        await self.debian.publish()
        self.wheel = self.pypi.add_release("tinypkg", "1.0")
        self.npm_releases = [
            self.npm.add_release("left-pad", "1.0.0"),
            self.npm.add_release("@acme/greeter", "1.0.0", {"left-pad": "^1.0.0"}),
        ]

    def config(self, cache_dir: Path, access_log: Path) -> str:
        return f"""\
cache-dir = "{cache_dir}"
access-log = "{access_log}"
volatile-max-age = 3600
min-revalidation-interval = 3600

[mirrors.debian]
kind = "debian"
sources = ["{self.debian_server.url}"]

[mirrors.gentoo]
kind = "gentoo"
sources = ["{self.gentoo.url}"]

[mirrors.pypi]
kind = "pypi"
sources = ["{self.pypi.url}"]
files = ["{self.pypi.files_host.url}"]

[mirrors.npm]
kind = "npm"
sources = ["{self.npm.url}"]
"""

    def requests_seen(self) -> dict[str, int]:
        return {
            "debian": len(self.debian_server.requests),
            "gentoo": len(self.gentoo.origin.requests),
            "pypi index": len(self.pypi.requests),
            "pypi files": len(self.pypi.files_host.requests),
            "npm": len(self.npm.requests),
        }

    async def stop(self) -> None:
        await self.debian_server.stop()
        await self.gentoo.stop()
        await self.pypi.stop()
        await self.npm.stop()


@pytest_twisted.async_yield_fixture
async def upstreams(tmp_path):
    signer = await Signer.generate()
    made = Upstreams(tmp_path / "upstreams", signer)
    await made.publish()
    yield made
    await made.stop()
    await signer.close()


@pytest.fixture
def pkgcache(tmp_path, upstreams):
    """The one ``twist pkgcache``, configured by a file alone (as systemd runs it)."""
    config = tmp_path / "pkgcache.toml"
    config.write_text(upstreams.config(tmp_path / "cache", tmp_path / "access.log"))
    process = TwistProcess("--config", str(config), cwd=tmp_path)
    yield process
    process.kill()


class Clients:
    """One machine of each kind, new and knowing nothing, pointed at ``url``."""

    def __init__(self, home: Path, url: str, upstreams: Upstreams) -> None:
        self.home = home
        self.url = url
        self.upstreams = upstreams
        self.apt = Apt(home / "apt", sources=[upstreams.debian.sources_line(url + "/debian/")])
        self.pip = Pip(home / "pip")
        self.uv = Uv(home / "uv")
        self.npm = Npm(home / "npm")

    async def install_everything(self) -> None:
        (await self.apt.update()).check()
        (await self.apt.download("hello")).check()
        [deb] = self.apt.downloaded("hello")
        assert hashlib.sha256(deb.read_bytes()).hexdigest() == self.upstreams.debian.packages[
            "hello"].sha256

        # Portage reads the mirror's layout.conf, then fetches by it.
        mirror = self.url + "/gentoo"
        layout = await run(["curl", "-sS", "--fail", "--max-time", "20",
                            mirror + "/distfiles/layout.conf"])
        assert layout.code == 0 and layout.stdout.encode() == LAYOUT, layout.describe()
        distfile = self.home / "foo-1.0.tar.gz"
        fetched = await run(["wget", "-q", "-T", "20", "-O", str(distfile),
                             mirror + DISTFILE_PATH])
        assert fetched.code == 0 and distfile.read_bytes() == DISTFILE, fetched.describe()

        index_url = self.url + "/pypi/simple/"
        assert installed_version(await self.pip.install(index_url, "tinypkg"), "tinypkg") == "1.0"
        assert installed_version(await self.uv.install(index_url, "tinypkg"), "tinypkg") == "1.0"

        # npm checks each tarball against the integrity its document gives.
        project = await self.npm.install(self.url + "/npm/", "@acme/greeter")
        assert npm_installed_version(project, "@acme/greeter") == "1.0.0"
        assert npm_installed_version(project, "left-pad") == "1.0.0"


@pytest_twisted.ensureDeferred
async def test_a_second_round_of_clean_clients_contacts_no_upstream(
    tmp_path, upstreams, pkgcache, http
):
    await pkgcache.ready(http)
    await Clients(tmp_path / "first", pkgcache.url, upstreams).install_everything()
    filled = upstreams.requests_seen()
    assert all(filled.values()), filled

    await Clients(tmp_path / "second", pkgcache.url, upstreams).install_everything()
    assert upstreams.requests_seen() == filled

    cache = tmp_path / "cache"
    assert (cache / "debian" / upstreams.debian.packages["hello"].filename).is_file()
    assert (cache / "gentoo" / DISTFILE_PATH.lstrip("/")).read_bytes() == DISTFILE
    wheel = upstreams.wheel
    assert (cache / "pypi" / "files" / wheel.hosted_path.lstrip("/")).read_bytes() == wheel.data
    log = (tmp_path / "access.log").read_text()
    for release in upstreams.npm_releases:
        assert (cache / "npm" / release.tarball_path.lstrip("/")).is_file()
    for mirror in ("debian", "gentoo", "pypi", "npm"):
        assert f"GET /{mirror}/" in log


@pytest_twisted.ensureDeferred
async def test_the_root_lists_each_mirror_with_its_client_line(pkgcache, http):
    await pkgcache.ready(http)
    response, body = await fetch(http, pkgcache.url + "/")
    page = body.decode()
    assert response.code == 200
    assert f"deb {pkgcache.url}/debian/ SUITE main" in page
    assert f'GENTOO_MIRRORS="{pkgcache.url}/gentoo/"' in page
    assert f"--index-url {pkgcache.url}/pypi/simple/" in page
    assert f"--registry {pkgcache.url}/npm/" in page
