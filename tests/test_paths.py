"""
Request paths become cache keys only when they are safe.
"""

import pytest

from pkgcache.paths import MAX_SEGMENT_BYTES, CacheKey, UnsafePath, cache_key_from_postpath


def test_plain_path():
    key = cache_key_from_postpath([b"distfiles", b"ab", b"foo-1.2.tar.gz"])
    assert key == CacheKey(("distfiles", "ab", "foo-1.2.tar.gz"))
    assert str(key) == "/distfiles/ab/foo-1.2.tar.gz"


def test_unicode_and_odd_but_harmless_names():
    key = cache_key_from_postpath([b"pool", "ü".encode(), b"a b+c%d.deb"])
    assert key.segments == ("pool", "ü", "a b+c%d.deb")


@pytest.mark.parametrize(
    "postpath",
    [
        [b"a", b"..", b"b"],
        [b".."],
        [b"a", b".", b"b"],
        [b"", b"etc"],
        [b"a", b"", b"b"],
        [b"a", b"../../etc/passwd"],
        [b"a", b"x\\..\\y"],
        [b"a", b"nul\0byte"],
        [b"a", b"bad\xffutf8"],
        [b"a", b"x" * (MAX_SEGMENT_BYTES + 1)],
        [b"a"] * 1100,
        [b"a", b"line\nbreak"],
    ],
)
def test_unsafe_paths_are_bad_requests(postpath):
    with pytest.raises(UnsafePath) as raised:
        cache_key_from_postpath(postpath)
    assert raised.value.status == 400


@pytest.mark.parametrize(
    "postpath",
    [[], [b""], [b".pkgcache-spool", b"x"], [b"simple", b".pkgcache-index"],
     [b".pkgcache-index", b""]],
)
def test_the_root_and_reserved_names_are_not_found(postpath):
    with pytest.raises(UnsafePath) as raised:
        cache_key_from_postpath(postpath)
    assert raised.value.status == 404


def test_longest_allowed_segment():
    name = b"y" * MAX_SEGMENT_BYTES
    assert cache_key_from_postpath([name]).segments == (name.decode(),)


def test_a_directory_url_is_a_key_of_its_own():
    directory = cache_key_from_postpath([b"simple", b"pkg", b""])
    file = cache_key_from_postpath([b"simple", b"pkg"])
    assert directory.directory and not file.directory
    assert directory != file
    assert str(directory) == "/simple/pkg/"
    assert str(file) == "/simple/pkg"
