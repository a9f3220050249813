"""
Reading a Debian suite's Release and InRelease files, and placing request
paths relative to them.
"""

import calendar
import hashlib

import pytest

from pkgcache.kinds.debian import (
    IndexEntry,
    ReleaseFile,
    by_hash_path,
    is_by_hash,
    is_release_file,
    parse_release,
    relative_to_release,
    release_directory,
)

#: The index files a small suite lists, with made-up contents.
INDEXES = {
    "main/binary-amd64/Packages": b"Package: hello\nVersion: 2.10-3\n\n",
    "main/binary-amd64/Packages.xz": b"\xfd7zXZ\x00 not really xz",
    "main/binary-amd64/Release": b"Archive: stable\nComponent: main\n",
    "main/i18n/Translation-en.bz2": b"BZh9 not really bzip2",
    "Contents-amd64.gz": b"\x1f\x8b not really gzip",
}
#: Listed under MD5Sum and SHA1 only: a Release file that lists it there and
#: not under SHA256 must not make pkgcache believe it has a SHA-256.
LEGACY_ONLY = ("main/source/Sources", b"Package: hello\n")

DATE = "Sat, 10 Jun 2023 09:30:11 UTC"
DATE_SECONDS = float(calendar.timegm((2023, 6, 10, 9, 30, 11)))


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def hash_section(name: str, digest, files) -> list[str]:
    lines = [f"{name}:"]
    for path, content in files:
        lines.append(f" {digest(content).hexdigest()} {len(content):>8} {path}")
    return lines


def release_text(*, date: str = DATE, by_hash: str = "yes") -> str:
    """A Release file shaped like the ones Debian's archive software writes."""
    legacy = [*INDEXES.items(), LEGACY_ONLY]
    lines = [
        "Origin: Debian",
        "Label: Debian",
        "Suite: stable",
        "Version: 12.0",
        "Codename: bookworm",
        "Changelogs: https://mirror.example/changelogs/@CHANGEPATH@_changelog",
        f"Date: {date}",
        f"Acquire-By-Hash: {by_hash}",
        "No-Support-for-Architecture-all: Packages",
        "Architectures: all amd64 arm64",
        "Components: main contrib non-free-firmware",
        "Description: Debian 12.0 Released 10 June 2023",
        *hash_section("MD5Sum", hashlib.md5, legacy),
        *hash_section("SHA1", hashlib.sha1, legacy),
        *hash_section("SHA256", hashlib.sha256, INDEXES.items()),
    ]
    return "\n".join(lines) + "\n"


def clear_sign(body: str) -> str:
    """
    Wrap ``body`` as ``gpg --clearsign`` does, signature made up: lines that
    start with a dash are dash-escaped, and so is one that need not be (RFC
    4880 allows escaping any line).
    """
    escaped = []
    for line in body.split("\n"):
        if line.startswith("-") or line.startswith("Acquire-By-Hash:"):
            line = "- " + line
        escaped.append(line)
    return (
        "-----BEGIN PGP SIGNED MESSAGE-----\n"
        "Hash: SHA512\n"
        "\n"
        + "\n".join(escaped).rstrip("\n")
        + "\n-----BEGIN PGP SIGNATURE-----\n"
        "\n"
        "iQIzBAEBCgAdFiEEfakefakefakefakefakefakefakefakeFAmSEQfMACgkQfake\n"
        "=AbCd\n"
        "-----END PGP SIGNATURE-----\n"
    )


def expected_entries() -> dict:
    return {
        path: IndexEntry(size=len(content), sha256=sha256(content))
        for path, content in INDEXES.items()
    }


def test_release_file():
    release = parse_release(release_text().encode())
    assert release == ReleaseFile(
        date=DATE_SECONDS, sha256=expected_entries(), acquire_by_hash=True
    )


def test_only_the_sha256_section_counts():
    release = parse_release(release_text().encode())
    assert LEGACY_ONLY[0] not in release.sha256
    for entry in release.sha256.values():
        assert len(entry.sha256) == 64


def test_in_release_file():
    release = parse_release(clear_sign(release_text()).encode())
    assert release == ReleaseFile(
        date=DATE_SECONDS, sha256=expected_entries(), acquire_by_hash=True
    )


def test_dash_escaping_is_undone_after_all_armor_headers():
    body = "Date: " + DATE + "\n- Acquire-By-Hash: yes\n"
    text = (
        "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\nCharset: UTF-8\n\n"
        + body
        + "-----BEGIN PGP SIGNATURE-----\n=AbCd\n-----END PGP SIGNATURE-----\n"
    )
    release = parse_release(text.encode())
    assert release.acquire_by_hash
    assert release.date == DATE_SECONDS


def test_text_outside_the_signed_message_is_ignored():
    forged = sha256(b"forged")
    signed = clear_sign(release_text(by_hash="no"))
    text = (
        f"Acquire-By-Hash: yes\nSHA256:\n {forged} 6 main/forged-before\n\n"
        + signed
        + f"SHA256:\n {forged} 6 main/forged-after\n"
    )
    release = parse_release(text.encode())
    assert not release.acquire_by_hash
    assert release.sha256 == expected_entries()


def test_signature_block_is_not_read():
    # No empty line after the signature's first line, so only the end of the
    # signed text keeps these lines out of the paragraph.
    text = (
        "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n"
        f"Date: {DATE}\nSHA256:\n {sha256(b'a')} 1 main/a\n"
        "-----BEGIN PGP SIGNATURE-----\n"
        f" {sha256(b'x')} 1 main/in-signature\n"
        "Acquire-By-Hash: yes\n"
        "-----END PGP SIGNATURE-----\n"
    )
    release = parse_release(text.encode())
    assert release.sha256 == {"main/a": IndexEntry(1, sha256(b"a"))}
    assert not release.acquire_by_hash


def test_crlf_line_ends():
    plain = release_text()
    expected = parse_release(plain.encode())
    assert parse_release(plain.replace("\n", "\r\n").encode()) == expected
    signed = clear_sign(plain).replace("\n", "\r\n")
    assert parse_release(signed.encode()) == expected


@pytest.mark.parametrize(
    "date, seconds",
    [
        (DATE, DATE_SECONDS),
        ("Sat, 10 Jun 2023 11:30:11 +0200", DATE_SECONDS),
        # No zone: taken as UTC, as the archive writes UTC.
        ("Sat, 10 Jun 2023 09:30:11", DATE_SECONDS),
        ("Sat, 10 Jun 2023 09:30:11 -0000", DATE_SECONDS),
        ("yesterday", None),
        ("", None),
        ("Sat, 45 Foo 2023 99:99:99 UTC", None),
    ],
)
def test_dates(date, seconds):
    assert parse_release(release_text(date=date).encode()).date == seconds


def test_missing_fields():
    release = parse_release(b"Origin: Debian\nSuite: stable\n")
    assert release == ReleaseFile(date=None, sha256={}, acquire_by_hash=False)


@pytest.mark.parametrize(
    "value, expected", [("yes", True), ("Yes", True), ("no", False), ("", False)]
)
def test_acquire_by_hash_values(value, expected):
    release = parse_release(release_text(by_hash=value).encode())
    assert release.acquire_by_hash is expected


def test_malformed_sha256_lines_are_skipped():
    good = sha256(b"good")
    text = "\n".join(
        [
            "SHA256:",
            f" {good} 4 main/good",
            f" {good} 4",
            f" {good} 4 main/extra word",
            f" {good[:-1]} 4 main/short-hash",
            f" {'g' * 64} 4 main/not-hex",
            f" {good} four main/bad-size",
            f" {good} +4 main/signed-size",
            f" {good} -4 main/negative-size",
            f" {good} 4 ../escapes",
            f" {good} 4 /absolute",
            f" {good} 4 main//empty-segment",
            f" {good.upper()} 4 main/upper-case",
            f"\t{good} 4 main/tab-indented",
            "",
        ]
    )
    release = parse_release(text.encode())
    assert release.sha256 == {
        "main/good": IndexEntry(4, good),
        "main/upper-case": IndexEntry(4, good),
        "main/tab-indented": IndexEntry(4, good),
    }


def test_unknown_fields_and_stray_lines_are_ignored():
    entry = sha256(b"a")
    text = "\n".join(
        [
            "# a comment",
            "X-Unknown-Field: something",
            " with a continuation line",
            "SHA256:",
            f" {entry} 1 main/listed",
            "not a field at all",
            # Belongs to the stray line above, not to SHA256.
            f" {entry} 1 main/after-stray-line",
            "has space: in the name",
            f"Date: {DATE}",
            "",
        ]
    )
    release = parse_release(text.encode())
    assert release.sha256 == {"main/listed": IndexEntry(1, entry)}
    assert release.date == DATE_SECONDS


def test_field_names_are_case_insensitive():
    entry = sha256(b"a")
    text = f"date: {DATE}\nACQUIRE-BY-HASH: yes\nsha256:\n {entry} 1 main/a\n"
    assert parse_release(text.encode()) == ReleaseFile(
        date=DATE_SECONDS, sha256={"main/a": IndexEntry(1, entry)}, acquire_by_hash=True
    )


def test_only_the_first_paragraph_counts():
    text = "\n\nDate: " + DATE + "\n\nAcquire-By-Hash: yes\n"
    release = parse_release(text.encode())
    assert release.date == DATE_SECONDS
    assert not release.acquire_by_hash


@pytest.mark.parametrize(
    "data", [b"", b"\n\n", b"-----BEGIN PGP SIGNED MESSAGE-----\n"]
)
def test_empty_input(data):
    empty = ReleaseFile(date=None, sha256={}, acquire_by_hash=False)
    assert parse_release(data) == empty


def test_not_text():
    with pytest.raises(ValueError):
        parse_release(b"Date: \xff\xfe\x00binary")


def test_entries_cannot_be_changed():
    release = parse_release(release_text().encode())
    with pytest.raises(TypeError):
        release.sha256["main/new"] = IndexEntry(1, sha256(b"x"))


def test_large_release_file():
    files = [(f"main/binary-arch{n}/Packages.xz", str(n).encode()) for n in range(5000)]
    text = "\n".join(
        [
            "Date: " + DATE,
            *hash_section("MD5Sum", hashlib.md5, files),
            *hash_section("SHA256", hashlib.sha256, files),
        ]
    )
    release = parse_release(clear_sign(text).encode())
    assert len(release.sha256) == 5000
    assert release.sha256["main/binary-arch4999/Packages.xz"] == IndexEntry(
        4, sha256(b"4999")
    )


@pytest.mark.parametrize(
    "path, directory",
    [
        (
            "/debian/dists/bookworm/main/binary-amd64/Packages.xz",
            "/debian/dists/bookworm",
        ),
        ("/debian/dists/bookworm/InRelease", "/debian/dists/bookworm"),
        ("/debian/dists/bookworm-updates/Release", "/debian/dists/bookworm-updates"),
        ("/dists/sid/main/i18n/Translation-en.bz2", "/dists/sid"),
        ("/a/b/dists/stable/Contents-amd64.gz", "/a/b/dists/stable"),
        # The first dists segment wins.
        ("/debian/dists/bookworm/main/dists/x", "/debian/dists/bookworm"),
        # A two-segment suite is read as one segment.
        ("/security/dists/stretch/updates/Release", "/security/dists/stretch"),
        ("/debian/dists/bookworm", None),
        ("/debian/dists/bookworm/", None),
        ("/debian/dists", None),
        ("/debian/dists//main/Packages", None),
        ("/debian/pool/main/h/hello/hello_2.10-3_amd64.deb", None),
        ("/debian/distsx/bookworm/Release", None),
        ("/", None),
    ],
)
def test_release_directory(path, directory):
    assert release_directory(path) == directory


@pytest.mark.parametrize(
    "path, expected",
    [
        (
            "/debian/dists/bookworm/main/binary-amd64/Packages.xz",
            ("/debian/dists/bookworm", "main/binary-amd64/Packages.xz"),
        ),
        (
            "/debian/dists/bookworm/main/binary-amd64/Release",
            ("/debian/dists/bookworm", "main/binary-amd64/Release"),
        ),
        (
            "/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/abc",
            ("/debian/dists/bookworm", "main/binary-amd64/by-hash/SHA256/abc"),
        ),
        ("/debian/dists/bookworm/InRelease", None),
        ("/debian/dists/bookworm/Release", None),
        ("/debian/dists/bookworm/Release.gpg", None),
        ("/debian/pool/main/h/hello/hello_2.10-3_amd64.deb", None),
    ],
)
def test_relative_to_release(path, expected):
    assert relative_to_release(path) == expected


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/debian/dists/bookworm/InRelease", True),
        ("/debian/dists/bookworm/Release", True),
        ("/debian/dists/bookworm-updates/InRelease", True),
        ("/debian/dists/bookworm/Release.gpg", False),
        ("/debian/dists/bookworm/main/binary-amd64/Release", False),
        ("/debian/InRelease", False),
        ("/debian/dists/InRelease", False),
        ("/debian/pool/main/r/Release", False),
    ],
)
def test_is_release_file(path, expected):
    assert is_release_file(path) is expected


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/abc", True),
        ("main/by-hash/SHA256/abc", True),
        ("/debian/dists/bookworm/main/binary-amd64/Packages.xz", False),
        ("/debian/pool/main/b/by-hash-tool/by-hash-tool_1.0.deb", False),
    ],
)
def test_is_by_hash(path, expected):
    assert is_by_hash(path) is expected


def test_by_hash_path():
    digest = sha256(b"x")
    assert by_hash_path("main/binary-amd64/Packages.xz", digest) == (
        f"main/binary-amd64/by-hash/SHA256/{digest}"
    )
    assert by_hash_path("Contents-amd64.gz", digest) == f"by-hash/SHA256/{digest}"


def test_request_path_to_by_hash_path():
    """The helpers together: from a request to the file apt would fetch instead."""
    release = parse_release(clear_sign(release_text()).encode())
    request = "/debian/dists/bookworm/main/binary-amd64/Packages.xz"
    directory, relative = relative_to_release(request)
    entry = release.sha256[relative]
    by_hash = f"{directory}/{by_hash_path(relative, entry.sha256)}"
    assert by_hash == (
        "/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/"
        + sha256(INDEXES["main/binary-amd64/Packages.xz"])
    )
    assert is_by_hash(by_hash)
    assert release_directory(by_hash) == directory
