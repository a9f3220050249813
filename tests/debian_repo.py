"""
A real Debian repository that a test can change while it runs, a real HTTP
server for it on 127.0.0.1, and a sandboxed ``apt-get`` to point at it.

- :class:`DebianRepo` builds tiny real ``.deb`` files with ``dpkg-deb`` and
  publishes ``Packages`` (plain, ``.gz``, ``.xz``), ``by-hash`` copies and a
  ``Release`` (clear-signed as ``InRelease`` by a :class:`Signer`) the way a
  mirror update does: every new file in place first, the ``Release`` files
  last.
- :class:`RepoServer` serves the repository's directory with
  ``twisted.web.static.File`` and records every request (path, the
  validators and ranges asked for, the status answered).
- :class:`Apt` runs ``apt-get``/``apt-cache`` as subprocesses with private
  state, cache, lists, sources, keyrings and dpkg status, so that nothing on
  the machine is read or changed; nothing is ever installed.

Every subprocess runs through :func:`run`: it never blocks the reactor, is
killed (with its whole process group) when it outlives its time, and is
killed too when the test gives up waiting for it.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Mapping, Optional, Sequence

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.web import static
from twisted.web.server import Site

#: What the tests here need from the machine (``dpkg-deb`` is in ``dpkg``,
#: ``gpg`` and ``gpg-agent`` sign; apt verifies with ``gpgv``, which apt
#: depends on).
TOOLS = ("apt-get", "apt-cache", "dpkg-deb")
SIGNING_TOOLS = ("gpg", "gpgconf", "gpg-agent")


def missing_tools(tools: Sequence[str] = TOOLS) -> list[str]:
    """The ones of ``tools`` that are not on ``PATH`` (``gpg-agent`` is
    looked for next to ``gpg``, where gpg starts it from)."""
    missing = []
    for tool in tools:
        if tool == "gpg-agent":
            if shutil.which("gpg-agent") is None and not Path("/usr/bin/gpg-agent").exists():
                missing.append(tool)
        elif shutil.which(tool) is None:
            missing.append(tool)
    return missing


# ---------------------------------------------------------------------------
# Subprocesses


@dataclass
class ProcessResult:
    argv: Sequence[str]
    code: Optional[int]
    signal: Optional[int]
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\n(exit {self.code}, signal {self.signal})\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )


class ProcessTimeout(AssertionError):
    """A subprocess outlived its time and was killed."""


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.ended: Deferred[tuple[Optional[int], Optional[int]]] = Deferred()

    def connectionMade(self) -> None:
        # Nothing here reads standard input: EOF at once, never a prompt.
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason) -> None:
        if reason.check(ProcessDone):
            self.ended.callback((0, None))
        elif reason.check(ProcessTerminated):
            self.ended.callback((reason.value.exitCode, reason.value.signal))
        else:  # pragma: no cover - Twisted reports only these two
            self.ended.errback(reason)


def _kill(pid: Optional[int]) -> None:
    """SIGKILL the process and its group (apt-get's methods, gpg's agent
    when it was started by this process...)."""
    if pid is None:
        return
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            # setsid has not run yet: the process alone is all there is.
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def run(
    argv: Sequence[str],
    *,
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 30.0,
    cwd: Optional[Path] = None,
) -> ProcessResult:
    """
    Run ``argv`` without blocking the reactor and return what it printed and
    how it ended.  It runs in a session of its own (``setsid``), so that on
    timeout, or when the awaiting test is cancelled, the whole group is
    killed, not just its leader.

    :raises ProcessTimeout: if it ran longer than ``timeout`` seconds.
    """
    argv = list(argv)
    spawned = ["setsid", *argv] if shutil.which("setsid") else argv
    collect = _Collect()
    environment = dict(env if env is not None else os.environ)
    process = reactor.spawnProcess(
        collect,
        shutil.which(spawned[0]) or spawned[0],
        spawned,
        env=environment,
        path=str(cwd) if cwd else None,
    )
    timed_out: list[bool] = []

    def expire() -> None:
        timed_out.append(True)
        _kill(process.pid)

    timer = reactor.callLater(timeout, expire)
    try:
        code, signal_number = await collect.ended
    except BaseException:
        # Cancelled (the test gave up): leave no process behind.
        _kill(process.pid)
        raise
    finally:
        if timer.active():
            timer.cancel()
    result = ProcessResult(
        argv,
        code,
        signal_number,
        b"".join(collect.out).decode("utf-8", "replace"),
        b"".join(collect.err).decode("utf-8", "replace"),
    )
    if timed_out:
        raise ProcessTimeout(f"killed after {timeout} s:\n{result.describe()}")
    return result


async def check_run(argv: Sequence[str], **options) -> ProcessResult:
    """:func:`run`, which must exit 0."""
    result = await run(argv, **options)
    if result.code != 0:
        raise AssertionError(f"command failed:\n{result.describe()}")
    return result


# ---------------------------------------------------------------------------
# Signing


class Signer:
    """
    A throwaway OpenPGP key in a private ``GNUPGHOME``, to clear-sign
    ``InRelease`` as a real archive does; apt verifies it against
    :attr:`keyring` given as ``[signed-by=...]``.

    The home is made with :func:`tempfile.mkdtemp`, not under pytest's
    ``tmp_path``: gpg-agent's socket lives there, and a socket path may
    not be longer than 107 bytes.
    """

    UID = "pkgcache test archive <archive@mirror.example>"

    def __init__(self, home: Path) -> None:
        self.home = home
        self.keyring = home / "archive-keyring.gpg"

    def _gpg(self, *args: str) -> list[str]:
        return [
            "gpg", "--homedir", str(self.home), "--batch", "--quiet",
            "--pinentry-mode", "loopback", "--passphrase", "", *args,
        ]

    @classmethod
    async def generate(cls) -> "Signer":
        home = Path(tempfile.mkdtemp(prefix="pkgcache-gpg-"))
        home.chmod(0o700)
        signer = cls(home)
        try:
            # ed25519: generated in milliseconds, whatever the entropy.
            await check_run(
                signer._gpg("--quick-gen-key", cls.UID, "ed25519", "sign", "never"),
                timeout=60,
            )
            await check_run(
                signer._gpg("--output", str(signer.keyring), "--export", cls.UID)
            )
        except BaseException:
            await signer.close()
            raise
        return signer

    async def clearsign(self, source: Path, target: Path) -> None:
        await check_run(
            self._gpg("--yes", "--digest-algo", "SHA256", "--output", str(target),
                      "--clearsign", str(source))
        )

    async def detach_sign(self, source: Path, target: Path) -> None:
        await check_run(
            self._gpg("--yes", "--digest-algo", "SHA256", "--armor", "--output",
                      str(target), "--detach-sign", str(source))
        )

    async def close(self) -> None:
        """Stop the agent gpg started for this home, and remove the home."""
        await run(["gpgconf", "--homedir", str(self.home), "--kill", "all"], timeout=10)
        shutil.rmtree(self.home, ignore_errors=True)


# ---------------------------------------------------------------------------
# The repository


@dataclass
class DebPackage:
    """One ``.deb`` in the pool, as its ``Packages`` stanza describes it."""

    name: str
    version: str
    arch: str
    filename: str  # relative to the repository root: pool/main/h/hello/...
    size: int
    md5: str
    sha256: str
    installed_size: int

    def stanza(self) -> str:
        return (
            f"Package: {self.name}\n"
            f"Version: {self.version}\n"
            f"Architecture: {self.arch}\n"
            f"Maintainer: pkgcache tests <tests@mirror.example>\n"
            f"Installed-Size: {self.installed_size}\n"
            f"Section: misc\n"
            f"Priority: optional\n"
            f"Filename: {self.filename}\n"
            f"Size: {self.size}\n"
            f"MD5sum: {self.md5}\n"
            f"SHA256: {self.sha256}\n"
            f"Description: {self.name}, a test package\n"
        )


@dataclass
class Index:
    """A file that ``Release`` lists, by its path under ``dists/SUITE/``."""

    path: str
    size: int
    md5: str
    sha256: str


def _sums(data: bytes) -> tuple[str, str]:
    return hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()


class DebianRepo:
    """
    A Debian archive under ``root`` with one suite, component and
    architecture, that changes when the test says so.

    :meth:`add_package` puts a new ``.deb`` in the pool (an older version
    of the same package stays in the pool, as on a mirror, but is no longer
    listed); nothing a client sees changes until :meth:`publish`, which
    writes the indexes, then ``Release``, ``Release.gpg`` and, last,
    ``InRelease``.  Each file is written beside its place and renamed into
    it, so a reader gets either the old or the new file, never a part.

    HTTP dates (``Last-Modified``, ``If-Modified-Since``) count whole
    seconds, and a test publishes twice within one: so every file a
    publication writes gets an mtime (and the ``Release`` a ``Date``)
    strictly later than the previous publication's, else a server would
    answer a revalidation of a changed file with 304.  The ``Date`` may run
    a second or two ahead of the clock; apt accepts up to 10 s
    (``Acquire::Max-FutureTime``).

    :param signer: clear-sign ``InRelease`` (and sign ``Release.gpg``);
        without one, only ``Release`` is published and apt must be told
        ``[trusted=yes]``.
    :param by_hash: publish ``Acquire-By-Hash: yes`` and every index under
        ``by-hash/SHA256/<hex>`` too (old ones are kept, as a mirror
        keeps them for clients in the middle of an update).
    """

    def __init__(
        self,
        root: Path,
        suite: str = "stable",
        component: str = "main",
        arch: str = "amd64",
        *,
        by_hash: bool = True,
        signer: Optional[Signer] = None,
    ) -> None:
        self.root = root
        self.suite = suite
        self.component = component
        self.arch = arch
        self.by_hash = by_hash
        self.signer = signer
        self.packages: dict[str, DebPackage] = {}
        self.indexes: list[Index] = []
        self.published = 0
        self._last_stamp = 0
        self._build = root.parent / (root.name + "-build")
        root.mkdir(parents=True, exist_ok=True)
        self._build.mkdir(parents=True, exist_ok=True)

    # Paths, as a client asks for them (relative to the repository's URL).

    @property
    def dists(self) -> str:
        return f"dists/{self.suite}"

    @property
    def binary_dir(self) -> str:
        return f"{self.dists}/{self.component}/binary-{self.arch}"

    def by_hash_path(self, index: str) -> str:
        """Where ``index`` (``Packages.xz``...) of the last publication is
        under ``by-hash``."""
        entry = self.index(f"{self.component}/binary-{self.arch}/{index}")
        return f"{self.binary_dir}/by-hash/SHA256/{entry.sha256}"

    def index(self, path: str) -> Index:
        """The entry of the last ``Release`` for ``path`` (relative to
        ``dists/SUITE``)."""
        for entry in self.indexes:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def sources_line(self, url: str) -> str:
        """The ``sources.list`` line for this repository served at ``url``."""
        if self.signer is not None:
            options = f"[signed-by={self.signer.keyring}]"
        else:
            options = "[trusted=yes]"
        return f"deb {options} {url.rstrip('/')}/ {self.suite} {self.component}"

    # Changing it.

    async def add_package(self, name: str, version: str) -> DebPackage:
        """
        Build ``NAME_VERSION_ARCH.deb`` with ``dpkg-deb`` (a control file
        and ``/usr/share/doc/NAME/README``) and put it in the pool; it is
        listed from the next :meth:`publish` on.
        """
        tree = self._build / f"{name}-{version}"
        shutil.rmtree(tree, ignore_errors=True)
        (tree / "DEBIAN").mkdir(parents=True)
        doc = tree / "usr" / "share" / "doc" / name
        doc.mkdir(parents=True)
        (doc / "README").write_text(f"{name} {version}: built by pkgcache's tests.\n")
        (tree / "DEBIAN" / "control").write_text(
            f"Package: {name}\n"
            f"Version: {version}\n"
            f"Architecture: {self.arch}\n"
            f"Maintainer: pkgcache tests <tests@mirror.example>\n"
            f"Installed-Size: 1\n"
            f"Section: misc\n"
            f"Priority: optional\n"
            f"Description: {name}, a test package\n"
        )
        upstream_version = version.split(":", 1)[-1]  # no epoch in file names
        pool = f"pool/{self.component}/{name[0]}/{name}"
        filename = f"{pool}/{name}_{upstream_version}_{self.arch}.deb"
        built = self._build / Path(filename).name
        await check_run(
            ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(built)]
        )
        data = built.read_bytes()
        built.unlink()
        shutil.rmtree(tree)
        (self.root / pool).mkdir(parents=True, exist_ok=True)
        self._write(filename, data, time.time())
        md5, sha256 = _sums(data)
        package = DebPackage(name, version, self.arch, filename, len(data), md5, sha256, 1)
        self.packages[name] = package
        return package

    async def publish(self) -> None:
        """
        Publish what was added, in a mirror's order: ``Packages``,
        ``Packages.gz``, ``Packages.xz`` (and their ``by-hash`` copies),
        then ``Release``, ``Release.gpg``, then ``InRelease``.
        """
        stamp = max(int(time.time()), self._last_stamp + 1)
        self._last_stamp = stamp
        text = "\n".join(p.stanza() for _, p in sorted(self.packages.items())).encode()
        plain = f"{self.component}/binary-{self.arch}/Packages"
        files = {
            plain: text,
            plain + ".gz": gzip.compress(text, mtime=0),
            plain + ".xz": lzma.compress(text, format=lzma.FORMAT_XZ),
        }
        indexes = []
        for path, data in files.items():
            md5, sha256 = _sums(data)
            indexes.append(Index(path, len(data), md5, sha256))
            if self.by_hash:
                directory = path.rsplit("/", 1)[0]
                self._write(f"{self.dists}/{directory}/by-hash/SHA256/{sha256}", data, stamp)
                self._write(f"{self.dists}/{directory}/by-hash/MD5Sum/{md5}", data, stamp)
        for path, data in files.items():
            self._write(f"{self.dists}/{path}", data, stamp)
        self.indexes = indexes

        release = self._release(stamp, indexes)
        staged = self._build / "Release"
        staged.write_bytes(release)
        self._write(f"{self.dists}/Release", release, stamp)
        if self.signer is not None:
            await self.signer.detach_sign(staged, self._build / "Release.gpg")
            await self.signer.clearsign(staged, self._build / "InRelease")
            self._write(f"{self.dists}/Release.gpg",
                        (self._build / "Release.gpg").read_bytes(), stamp)
            self._write(f"{self.dists}/InRelease",
                        (self._build / "InRelease").read_bytes(), stamp)
        self.published += 1

    def _release(self, stamp: int, indexes: list[Index]) -> bytes:
        date = formatdate(stamp, usegmt=True).replace("GMT", "UTC")
        lines = [
            "Origin: pkgcache-tests",
            "Label: pkgcache-tests",
            f"Suite: {self.suite}",
            f"Codename: {self.suite}",
            f"Date: {date}",
            f"Architectures: {self.arch}",
            f"Components: {self.component}",
            "Description: a repository that pkgcache's tests change",
        ]
        if self.by_hash:
            lines.append("Acquire-By-Hash: yes")
        lines.append("MD5Sum:")
        lines += [f" {i.md5} {i.size:>8} {i.path}" for i in indexes]
        lines.append("SHA256:")
        lines += [f" {i.sha256} {i.size:>8} {i.path}" for i in indexes]
        return ("\n".join(lines) + "\n").encode()

    def _write(self, path: str, data: bytes, mtime: float) -> None:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(f".{target.name}.new")
        staged.write_bytes(data)
        os.utime(staged, (mtime, mtime))
        os.replace(staged, target)


# ---------------------------------------------------------------------------
# Serving it


@dataclass
class SeenRequest:
    """One request the repository's server received."""

    method: str
    path: str
    headers: dict[str, str]
    code: Optional[int] = None  # set once answered


class _MirrorFile(static.File):
    # A mirror serves Packages.gz as the file it is, not as a gzip-encoded
    # Packages: no Content-Encoding, whatever the name.
    contentEncodings: dict = {}


class _RecordingSite(Site):
    def __init__(self, resource, seen: list[SeenRequest]) -> None:
        super().__init__(resource)
        self._seen = seen
        self._pending: dict[int, SeenRequest] = {}
        #: the connections requests came on, to drop when the mirror "dies"
        self.transports: list = []

    def getResourceFor(self, request):
        headers = {
            name.decode("latin-1").lower(): b", ".join(values).decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        seen = SeenRequest(request.method.decode(), request.path.decode(), headers)
        self._seen.append(seen)
        if request.transport not in self.transports:
            self.transports.append(request.transport)
        self._pending[id(request)] = seen
        return super().getResourceFor(request)

    def log(self, request) -> None:
        seen = self._pending.pop(id(request), None)
        if seen is not None:
            seen.code = request.code


class RepoServer:
    """``repo.root`` served over HTTP on 127.0.0.1 by ``static.File``
    (``Last-Modified`` from the mtime, 304 to ``If-Modified-Since``,
    ranges), every request recorded in :attr:`requests`."""

    def __init__(self, root: Path) -> None:
        self.requests: list[SeenRequest] = []
        self.site = _RecordingSite(_MirrorFile(str(root)), self.requests)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/"

    def count(self, path: str, method: str = "GET", code: Optional[int] = None) -> int:
        """How many requests for ``path`` (``/dists/...``) came, optionally
        only those answered with ``code``."""
        path = "/" + path.lstrip("/")
        return sum(
            1 for r in self.requests
            if r.path == path and r.method == method and (code is None or r.code == code)
        )

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    async def stop(self) -> None:
        """
        Go away like a dead mirror: stop listening and drop every open
        connection (a client's idle keep-alive connection would otherwise
        still be answered).  Again: nothing happens.
        """
        if self.port.connected:
            await self.port.stopListening()
        for transport in self.site.transports:
            if transport.connected:
                transport.abortConnection()
        self.site.transports.clear()


# ---------------------------------------------------------------------------
# apt


@dataclass
class AptResult(ProcessResult):
    def check(self) -> "AptResult":
        """Exit 0, no ``Hash Sum mismatch``, no error, no warning."""
        problems = [
            line for line in self.output.splitlines()
            if line.startswith(("E:", "W:", "Err:")) or "Hash Sum mismatch" in line
        ]
        assert self.code == 0 and not problems, self.describe()
        return self


@dataclass
class Apt:
    """
    ``apt-get``/``apt-cache`` in a sandbox under ``home``: its own
    configuration (read instead of ``/etc/apt``: ``APT_CONFIG`` names it and
    it points ``Dir::Etc::Parts`` at an empty directory), state, lists,
    archives, an empty dpkg status, no locking, no proxy, no retries, and
    ``APT::Sandbox::User=root`` (the private directories are not the
    ``_apt`` user's to write).  Nothing is installed: packages are only
    downloaded (``install --download-only``) into :attr:`archives`.

    :param by_hash: ``Acquire::By-Hash`` (``yes``: fetch indexes by hash
        when the ``Release`` offers it; ``no``: by their names).
    :param compression: the compressed index to fetch first (``xz``,
        ``gz``; apt's own order otherwise).
    :param max_age: ``Acquire::http::Max-Age``: apt sends ``Cache-Control:
        max-age=N`` with every index request, 0 unless told otherwise.
    """

    home: Path
    sources: Sequence[str] = ()
    arch: str = "amd64"
    by_hash: bool = True
    compression: Optional[str] = None
    max_age: Optional[int] = None
    timeout: float = 30.0
    config: Path = field(init=False)

    def __post_init__(self) -> None:
        for directory in ("etc/apt.conf.d", "etc/sources.list.d", "etc/preferences.d",
                          "etc/trusted.gpg.d", "state/lists/partial",
                          "cache/archives/partial", "log"):
            (self.home / directory).mkdir(parents=True, exist_ok=True)
        (self.home / "state" / "status").write_text("")
        self.config = self.home / "etc" / "apt.conf"
        self.set_sources(self.sources)
        options = {
            "Dir::Etc::Main": self.config,
            "Dir::Etc::Parts": self.home / "etc/apt.conf.d",
            "Dir::Etc::SourceList": self.home / "etc/sources.list",
            "Dir::Etc::SourceParts": self.home / "etc/sources.list.d",
            "Dir::Etc::Preferences": self.home / "etc/preferences",
            "Dir::Etc::PreferencesParts": self.home / "etc/preferences.d",
            "Dir::Etc::Trusted": self.home / "etc/trusted.gpg",
            "Dir::Etc::TrustedParts": self.home / "etc/trusted.gpg.d",
            "Dir::State": self.home / "state",
            "Dir::State::Lists": self.home / "state/lists",
            "Dir::State::status": self.home / "state/status",
            "Dir::Cache": self.home / "cache",
            "Dir::Cache::Archives": self.home / "cache/archives",
            "Dir::Log": self.home / "log",
            "Debug::NoLocking": "true",
            "APT::Sandbox::User": "root",
            "APT::Architecture": self.arch,
            "APT::Architectures": self.arch,
            "APT::Get::Assume-Yes": "true",
            "Acquire::http::Proxy": "DIRECT",
            "Acquire::Retries": "0",
            "Acquire::http::Timeout": "10",
            "Acquire::By-Hash": "yes" if self.by_hash else "no",
            "Acquire::Languages": "none",
            "Acquire::PDiffs": "false",
        }
        if self.max_age is not None:
            options["Acquire::http::Max-Age"] = self.max_age
        lines = [f'{name} "{value}";' for name, value in options.items()]
        if self.compression:
            lines.append(f'Acquire::CompressionTypes::Order {{ "{self.compression}"; }};')
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def archives(self) -> Path:
        return self.home / "cache" / "archives"

    def set_sources(self, lines: Sequence[str]) -> None:
        (self.home / "etc" / "sources.list").write_text("".join(f"{l}\n" for l in lines))

    def _env(self) -> dict[str, str]:
        # No http_proxy and friends (apt honours them when its own option is
        # unset), no locale surprises in the output.
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "APT_CONFIG": str(self.config),
            "HOME": str(self.home),
            "LC_ALL": "C.UTF-8",
            "DEBIAN_FRONTEND": "noninteractive",
        }

    async def run(self, *argv: str) -> AptResult:
        result = await run(argv, env=self._env(), timeout=self.timeout)
        return AptResult(**vars(result))

    async def update(self) -> AptResult:
        return await self.run("apt-get", "-q", "update")

    async def download(self, name: str) -> AptResult:
        """``apt-get install --download-only NAME``."""
        return await self.run("apt-get", "-q", "install", "--download-only", name)

    async def candidate(self, name: str) -> Optional[str]:
        """The version ``apt-get install NAME`` would take, from the lists."""
        result = await self.run("apt-cache", "policy", name)
        assert result.code == 0, result.describe()
        for line in result.stdout.splitlines():
            if line.strip().startswith("Candidate:"):
                version = line.split(":", 1)[1].strip()
                return None if version == "(none)" else version
        return None

    def downloaded(self, name: str) -> list[Path]:
        return sorted(self.archives.glob(f"{name}_*.deb"))


async def deb_version(deb: Path) -> str:
    """The ``Version`` in a ``.deb``'s control file, as dpkg reads it."""
    result = await check_run(["dpkg-deb", "-f", str(deb), "Version"])
    return result.stdout.strip()
