"""
``--mirror NAME[:KIND]=URL[,URL...]`` and ``--mirror-files``: the command
line's shorthand for a ``[mirrors.NAME]`` table, so a small site needs no
TOML file.  It must make the very mirrors, and say the very errors, that
the equivalent table does.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import pytest_twisted
from twisted.python import usage

from pkgcache.root import MirrorsResource
from pkgcache.sources import Source
from pkgcache.tap import Options, makeService
from tests.conftest import fetch, wait_for
from tests.test_twist import TWIST, TwistProcess


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "pkgcache.toml"
    path.write_text(text)
    return str(path)


def plain(mirror) -> dict:
    """A mirror's fields, its sources as text: ``Source`` has no equality."""
    def value(field):
        if isinstance(field, tuple):
            return tuple(str(item) if isinstance(item, Source) else item for item in field)
        return field

    return {f.name: value(getattr(mirror, f.name)) for f in dataclasses.fields(mirror)}


# (the command line, the [mirrors] tables that say the same)
EQUIVALENTS = [
    (
        ["--mirror", "debian:debian=https://deb.mirror.example/debian/,"
                     "https://deb2.mirror.example/debian/",
         "--mirror", "gentoo:gentoo=https://gentoo.mirror.example/"],
        '[mirrors.debian]\nkind = "debian"\n'
        'sources = ["https://deb.mirror.example/debian/", "https://deb2.mirror.example/debian/"]\n'
        '[mirrors.gentoo]\nkind = "gentoo"\nsources = ["https://gentoo.mirror.example/"]\n',
    ),
    (
        ["--mirror", "files=https://files.mirror.example/"],
        '[mirrors.files]\nsources = ["https://files.mirror.example/"]\n',
    ),
    (
        ["--mirror-files", "pypi=https://files.pypi.example/,https://files2.pypi.example/",
         "--mirror", "pypi:pypi=https://pypi.mirror.example/"],
        '[mirrors.pypi]\nkind = "pypi"\nsources = ["https://pypi.mirror.example/"]\n'
        'files = ["https://files.pypi.example/", "https://files2.pypi.example/"]\n',
    ),
    (
        ["--mirror", "npm:npm=https://npm.mirror.example/",
         "--mirror", "npm2:npm=https://npm2.mirror.example/",
         "--mirror-files", "npm2=https://tarballs.mirror.example/"],
        '[mirrors.npm]\nkind = "npm"\nsources = ["https://npm.mirror.example/"]\n'
        '[mirrors.npm2]\nkind = "npm"\nsources = ["https://npm2.mirror.example/"]\n'
        'files = ["https://tarballs.mirror.example/"]\n',
    ),
]


@pytest.mark.parametrize("args, tables", EQUIVALENTS)
def test_the_shorthand_makes_the_mirrors_its_tables_make(tmp_path, args, tables):
    cache = ["--cache-dir", str(tmp_path / "cache")]
    from_command_line = parse(*args, *cache)["mirrors"]
    from_file = parse("--config", write_config(tmp_path, tables), *cache)["mirrors"]
    assert [plain(m) for m in from_command_line] == [plain(m) for m in from_file]


# (a --mirror command line, the table that says the same): both must fail alike.
BAD_EQUIVALENTS = [
    (["--mirror", "x:cobol=http://a/"], '[mirrors.x]\nkind = "cobol"\nsources = ["http://a/"]\n'),
    (["--mirror", "x:=http://a/"], '[mirrors.x]\nkind = ""\nsources = ["http://a/"]\n'),
    (["--mirror", ".x=http://a/"], '[mirrors.".x"]\nsources = ["http://a/"]\n'),
    (["--mirror", "=http://a/"], '[mirrors.""]\nsources = ["http://a/"]\n'),
    (["--mirror", "a/b=http://a/"], '[mirrors."a/b"]\nsources = ["http://a/"]\n'),
    (["--mirror", "x:pypi=http://a/"], '[mirrors.x]\nkind = "pypi"\nsources = ["http://a/"]\n'),
    (["--mirror", "x=http://a/", "--mirror-files", "x=http://b/"],
     '[mirrors.x]\nsources = ["http://a/"]\nfiles = ["http://b/"]\n'),
    (["--mirror", "x="], "[mirrors.x]\nsources = []\n"),
    (["--mirror", "x=http://a/,ftp://b/"], '[mirrors.x]\nsources = ["http://a/", "ftp://b/"]\n'),
    (["--mirror", "x=http://a/?q"], '[mirrors.x]\nsources = ["http://a/?q"]\n'),
    (["--mirror", "x:pypi=http://a/", "--mirror-files", "x="],
     '[mirrors.x]\nkind = "pypi"\nsources = ["http://a/"]\nfiles = []\n'),
]


@pytest.mark.parametrize("args, table", BAD_EQUIVALENTS)
def test_the_shorthand_fails_as_its_table_does(tmp_path, args, table):
    cache = ["--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(usage.UsageError) as from_command_line:
        parse(*args, *cache)
    with pytest.raises(usage.UsageError) as from_file:
        parse("--config", write_config(tmp_path, table), *cache)
    said, in_file = str(from_command_line.value), str(from_file.value)
    assert said.startswith("--mirror: [mirrors.") and "\n" not in said
    # The same words after the part that says where the table came from.
    assert said.split("]: ", 1)[1] == in_file.split("]: ", 1)[1]


def test_a_mirror_of_the_command_line_comes_after_those_of_the_file(tmp_path):
    config = write_config(
        tmp_path, '[mirrors.debian]\nkind = "debian"\nsources = ["http://a.example/"]\n'
    )
    options = parse(
        "--config", config, "--cache-dir", str(tmp_path / "cache"),
        "--mirror", "gentoo:gentoo=http://b.example/,http://c.example/",
    )
    assert [(m.name, m.kind) for m in options["mirrors"]] == [
        ("debian", "debian"), ("gentoo", "gentoo")
    ]
    root = makeService(options).resource
    assert isinstance(root, MirrorsResource)
    gentoo = root.mirrors["gentoo"].tree
    assert [str(s) for s in gentoo.upstream.sources] == ["http://b.example/", "http://c.example/"]
    stored = gentoo.store.path_for(key("distfiles/x")).path
    assert stored == str(tmp_path / "cache/gentoo/distfiles/x")


def test_mirror_files_become_the_files_tree(tmp_path):
    options = parse(
        "--cache-dir", str(tmp_path / "cache"),
        "--mirror", "pypi:pypi=http://pypi.mirror.example/",
        "--mirror-files", "pypi=http://files.pypi.example/",
    )
    mirror = makeService(options).resource.mirrors["pypi"]
    assert [str(s) for s in mirror.files.upstream.sources] == ["http://files.pypi.example/"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mirror", "debian"], "--mirror 'debian': NAME=URL[,URL...] or NAME:KIND=URL[,URL...]"),
        (["--mirror", "x=http://a/", "--mirror", "x:debian=http://b/"],
         "--mirror: a mirror named 'x' is given twice"),
        (["--mirror-files", "x=http://b/"], "--mirror-files x: no --mirror x"),
        (["--mirror", "x:npm=http://a/", "--mirror-files", "x"], "--mirror-files 'x': NAME=URL"),
        (["--mirror", "x:npm=http://a/", "--mirror-files", "x:npm=http://b/"], "no KIND"),
        (["--mirror", "x:npm=http://a/", "--mirror-files", "x=http://b/",
          "--mirror-files", "x=http://c/"], "--mirror-files: 'x' is given twice"),
        (["--mirror", "x=http://a/", "--source", "http://b/"], "use one or the other"),
    ],
)
def test_bad_shorthands_are_one_line_errors(tmp_path, args, message):
    with pytest.raises(usage.UsageError) as raised:
        parse(*args, "--cache-dir", str(tmp_path / "cache"))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_name_in_the_file_and_on_the_command_line_is_one_line_error(tmp_path):
    config = write_config(tmp_path, '[mirrors.x]\nsources = ["http://a.example/"]\n')
    with pytest.raises(usage.UsageError) as raised:
        parse("--config", config, "--mirror", "x=http://b.example/",
              "--cache-dir", str(tmp_path / "cache"))
    said = str(raised.value)
    assert said == (
        f"--mirror: a mirror named 'x' is given twice (--config {config} has [mirrors.x])"
    )
    # --mirror-files is for the command line's mirrors: a table says its own files.
    with pytest.raises(usage.UsageError, match="no --mirror x"):
        parse("--config", config, "--mirror-files", "x=http://b.example/",
              "--cache-dir", str(tmp_path / "cache"))


def test_mirror_and_source_is_the_error_of_mirrors_and_source(tmp_path):
    cache = ["--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(usage.UsageError) as from_command_line:
        parse("--mirror", "x=http://a/", "--source", "http://b/", *cache)
    config = write_config(tmp_path, '[mirrors.x]\nsources = ["http://a/"]\n')
    with pytest.raises(usage.UsageError) as from_file:
        parse("--config", config, "--source", "http://b/", *cache)
    assert str(from_command_line.value) == str(from_file.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ('mirror = "x=http://a/"\n',
         "'mirror' is the command line's shorthand for a [mirrors.NAME] table"),
        ('mirror-files = "x=http://a/"\n[mirrors.x]\nkind = "npm"\nsources = ["http://a/"]\n',
         "'mirror-files' is the command line's for a mirror's 'files'"),
    ],
)
def test_the_shorthands_are_refused_in_a_file_for_its_tables(tmp_path, text, message):
    """A file has tables to say it: one way to say it there, told in one line."""
    config = write_config(tmp_path, text)
    for extra in ([], ["--mirror", "x=http://a/"]):
        with pytest.raises(usage.UsageError) as raised:
            parse("--config", config, *extra, "--cache-dir", str(tmp_path / "cache"))
        assert message in str(raised.value) and "\n" not in str(raised.value)


def key(path: str):
    from pkgcache.paths import cache_key_from_postpath

    return cache_key_from_postpath([part.encode() for part in path.split("/")])


def npm_document(registry: str) -> bytes:
    """A package document whose tarball is below its registry."""
    tarball = registry + "left-pad/-/left-pad-1.3.0.tgz"
    return json.dumps({
        "name": "left-pad",
        "versions": {"1.3.0": {"dist": {"tarball": tarball, "shasum": "0a1b"}}},
    }).encode()


@pytest.fixture
def twist(tmp_path):
    """``twist pkgcache ARGS`` started in a subprocess; killed after the test."""
    started: list[TwistProcess] = []

    def start(*args: str) -> TwistProcess:
        process = TwistProcess(*args, cwd=tmp_path)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.mark.skipif(not TWIST.exists(), reason="twist is not installed next to the interpreter")
@pytest_twisted.ensureDeferred
async def test_twist_serves_two_mirrors_of_the_command_line(origins, twist, http, tmp_path):
    a, b = origins(), origins()
    a.add("/pool/main/f/foo.deb", b"foo from a")
    b.add("/pool/main/b/bar.deb", b"bar from b, a has none")
    b.add("/left-pad", npm_document(b.url), content_type=b"application/json")
    b.add("/left-pad/-/left-pad-1.3.0.tgz", b"\x1f\x8b tarball")
    cache = tmp_path / "cache"
    server = twist(
        "--cache-dir", str(cache),
        "--mirror", f"debian:debian={a.url},{b.url}",
        "--mirror", f"npm:npm={b.url}",
        "--public-url", "https://cache.example/",
    )
    await server.ready(http)

    _, listing = await fetch(http, server.url + "/")
    assert (
        b"/debian/ (debian): in sources.list: deb https://cache.example/debian/ SUITE main"
        in listing
    )
    assert b"/npm/ (npm): npm install --registry https://cache.example/npm/" in listing

    for path, data in [("/pool/main/f/foo.deb", b"foo from a"),
                       ("/pool/main/b/bar.deb", b"bar from b, a has none")]:
        response, body = await fetch(http, server.url + "/debian" + path)
        assert (response.code, body) == (200, data)
        await wait_for(lambda: (cache / "debian" / path.lstrip("/")).exists())
    assert (a.count("/pool/main/b/bar.deb"), b.count("/pool/main/b/bar.deb")) == (1, 1)

    response, document = await fetch(http, server.url + "/npm/left-pad")
    assert response.code == 200
    (version,) = json.loads(document)["versions"].values()
    link = version["dist"]["tarball"]
    assert link == "https://cache.example/npm/left-pad/-/left-pad-1.3.0.tgz"
    _, tarball = await fetch(http, server.url + link[len("https://cache.example"):])
    assert tarball == b"\x1f\x8b tarball"
    await wait_for(lambda: (cache / "npm/left-pad/-/left-pad-1.3.0.tgz").exists())
    assert a.count("/left-pad") == 0, "the npm mirror asks only its own source"
