"""
The systemd units in contrib/systemd: ``systemd-analyze verify`` accepts them,
they agree with each other, and every example in ``pkgcache.default`` is a
command line that ``twist pkgcache`` and ``pkgcache-cull`` accept.

(``test_socket_activation.py`` runs the service's command line for real.)
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
UNIT_FILES = sorted(
    path for path in UNITS.iterdir() if path.suffix in (".socket", ".service", ".timer")
)
BIN = Path(sys.executable).parent
# Where the units expect the virtualenv (see contrib/systemd/README.rst).
SHIPPED_BIN = "/opt/pkgcache/bin/"


def read_unit(name: str) -> configparser.ConfigParser:
    """A unit file's sections; for a key given twice, the last value."""
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # keys are case-sensitive
    unit.read(UNITS / name, encoding="utf-8")
    return unit


def all_values(name: str, section: str, key: str) -> list[str]:
    """Every value of a key that may be repeated (configparser keeps the last)."""
    values, current = [], None
    for line in (UNITS / name).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.startswith(key + "="):
            values.append(line.split("=", 1)[1])
    return values


def parse_environment_file(text: str) -> list[tuple[str, str]]:
    """
    ``EnvironmentFile=`` as systemd reads it (src/basic/env-file.c), as far
    as pkgcache.default needs: comments, ``KEY=value``, surrounding quotes,
    backslash escapes and continuation lines.  The assignments come back in
    order; commented-out ones (``#KEY=value``) too, with the ``#`` kept in the
    key, so that the examples can be checked.
    """
    assignments = []
    for raw in re.split(r"(?<!\\)\n", text):
        line = raw.replace("\\\n", "")  # an escaped newline is removed
        stripped = line.strip()
        if not stripped or stripped.startswith(";") or (
            stripped.startswith("#") and not re.match(r"#[A-Z_]+=", stripped)
        ):
            continue
        key, _, value = stripped.partition("=")
        value = value.strip()
        if value[:1] in ("'", '"') and value.endswith(value[0]) and len(value) > 1:
            value = value[1:-1]
        else:
            value = re.sub(r"\\(.)", r"\1", value)
        assignments.append((key.strip(), value))
    return assignments


def split_like_systemd(value: str) -> list[str]:
    """An unbraced ``$VAR`` in ``ExecStart=``: split on whitespace, unquoted."""
    return shlex.split(value)


def test_environment_file_parser_matches_systemd_rules():
    text = (
        "# a comment\n"
        "A=--source http://a/ --source http://b/\n"
        "B=  --x 1 \\\n"
        "  --y 2\n"
        '#C="--z 3"\n'
        "D=\n"
    )
    assert parse_environment_file(text) == [
        ("A", "--source http://a/ --source http://b/"),
        ("B", "--x 1   --y 2"),
        ("#C", "--z 3"),
        ("D", ""),
    ]


# --- systemd-analyze verify ----------------------------------------------


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package: systemd)",
)
def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    """
    ``systemd-analyze verify`` checks every key and value, the references
    between the units, and that each ``ExecStart=`` program exists and is
    executable.  The units expect pkgcache in /opt/pkgcache; here they are
    copied with that path replaced by this environment's bin directory, so
    the check is against the twist and pkgcache-cull pip installed.
    """
    for program in ("twist", "pkgcache-cull"):
        assert (BIN / program).exists(), f"{BIN / program} is missing: pip install pkgcache"
    for unit in UNIT_FILES:
        text = unit.read_text(encoding="utf-8")
        assert SHIPPED_BIN in text or unit.suffix != ".service", unit.name
        (tmp_path / unit.name).write_text(text.replace(SHIPPED_BIN, f"{BIN}/"), encoding="utf-8")
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / unit.name) for unit in UNIT_FILES)],
        capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_LOG_LEVEL": "info"},
    )
    output = result.stdout + result.stderr
    # Other units on the machine may draw warnings of their own; ours may not.
    ours = [
        line for line in output.splitlines()
        if "pkgcache" in line or str(tmp_path) in line
    ]
    assert result.returncode == 0, output
    assert ours == [], output


# --- The units agree with each other -------------------------------------


def exec_start(name: str) -> list[str]:
    return shlex.split(read_unit(name)["Service"]["ExecStart"])


def option(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, (name, argv)
    return argv[argv.index(name) + 1]


def test_the_service_listens_on_the_socket_by_its_name_and_family():
    socket_unit = read_unit("pkgcache.socket")["Socket"]
    service = read_unit("pkgcache.service")
    argv = exec_start("pkgcache.service")
    assert option(argv, "--listen") == (
        f"systemd:domain=INET6:name={socket_unit['FileDescriptorName']}"
    )
    # domain=INET6 is right for a bare port (one dual-stack socket), and
    # BindIPv6Only=both keeps it dual-stack whatever the sysctl says.
    assert re.fullmatch(r"\d+", socket_unit["ListenStream"])
    assert socket_unit["BindIPv6Only"] == "both"
    assert socket_unit.get("Accept", "no") == "no"
    assert socket_unit["Service"] == "pkgcache.service"
    assert "pkgcache.socket" in service["Unit"]["Requires"].split()
    assert "pkgcache.socket" in service["Unit"]["After"].split()


def test_the_service_command_line():
    argv = exec_start("pkgcache.service")
    assert argv[0] == SHIPPED_BIN + "twist"
    # twist's own option, so before the plugin's name: twist logs JSON when
    # its output is not a terminal, and the journal wants text.
    assert argv[1:3] == ["--log-format=text", "pkgcache"]
    # Unbraced, so that systemd splits them into separate arguments.
    assert "$PKGCACHE_SOURCES" in argv and "$PKGCACHE_OPTIONS" in argv
    assert not any("${PKGCACHE" in word for word in argv)
    service = read_unit("pkgcache.service")["Service"]
    assert service["EnvironmentFile"] == "/etc/default/pkgcache"
    assert service["Restart"] == "on-failure"


def test_both_services_share_one_cache_directory_and_user():
    for name in ("pkgcache.service", "pkgcache-cull.service"):
        service = read_unit(name)["Service"]
        assert service["DynamicUser"] == "yes", name
        # The same dynamic user for both: systemd would otherwise re-chown
        # the whole cache to whichever unit started last.
        assert service["User"] == "pkgcache", name
        assert service["CacheDirectory"] == "pkgcache", name
        assert option(exec_start(name), "--cache-dir") == "/var/cache/pkgcache", name
    assert exec_start("pkgcache-cull.service")[0] == SHIPPED_BIN + "pkgcache-cull"
    # Skipped until pkgcache has made its cache (pkgcache-cull refuses a
    # directory without the spool directory in it).
    from pkgcache.store import SPOOL_DIR_NAME

    condition = read_unit("pkgcache-cull.service")["Unit"]["ConditionPathIsDirectory"]
    assert condition == f"/var/cache/pkgcache/{SPOOL_DIR_NAME}"
    assert "$PKGCACHE_CULL_OPTIONS" in exec_start("pkgcache-cull.service")


def test_the_service_is_sandboxed_but_can_fetch_over_https():
    service = read_unit("pkgcache.service")["Service"]
    for key, value in [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("LockPersonality", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ]:
        assert service.get(key) == value, key
    assert "@system-service" in all_values("pkgcache.service", "Service", "SystemCallFilter")
    # pyOpenSSL's TLS callbacks are cffi ffi.callback()s, which need
    # writable+executable memory: https:// sources would all fail.
    assert service.get("MemoryDenyWriteExecute", "no") == "no"
    # It must reach its sources.
    assert service.get("PrivateNetwork", "no") == "no"


def test_the_timer_starts_the_cull_service():
    timer = read_unit("pkgcache-cull.timer")
    assert timer["Timer"].get("Unit", "pkgcache-cull.service") == "pkgcache-cull.service"
    assert timer["Timer"]["OnCalendar"]
    assert timer["Install"]["WantedBy"] == "timers.target"
    assert read_unit("pkgcache.socket")["Install"]["WantedBy"] == "sockets.target"


# --- pkgcache.default ------------------------------------------------------


DEFAULT = parse_environment_file((UNITS / "pkgcache.default").read_text(encoding="utf-8"))


def examples(variable: str) -> list[str]:
    return [value for key, value in DEFAULT if key.lstrip("#") == variable]


def test_the_default_file_sets_every_variable_the_units_use():
    active = dict((key, value) for key, value in DEFAULT if not key.startswith("#"))
    assert set(active) == {"PKGCACHE_SOURCES", "PKGCACHE_OPTIONS", "PKGCACHE_CULL_OPTIONS"}
    assert split_like_systemd(active["PKGCACHE_SOURCES"])[0] == "--source"


def pkgcache_arguments(tmp_path: Path, sources: str, options: str) -> list[str]:
    """
    The service's arguments after ``pkgcache`` with these values, made to run
    here: a TCP port for the systemd socket, temporary directories for
    /var/cache/pkgcache and /var/log/pkgcache.
    """
    argv = exec_start("pkgcache.service")
    arguments: list[str] = []
    for word in argv[argv.index("pkgcache") + 1:]:
        if word == "$PKGCACHE_SOURCES":
            arguments.extend(split_like_systemd(sources))
        elif word == "$PKGCACHE_OPTIONS":
            arguments.extend(split_like_systemd(options))
        elif word.startswith("systemd:"):
            arguments.append("tcp:0:interface=127.0.0.1")
        elif word == "/var/cache/pkgcache":
            arguments.append(str(tmp_path / "cache"))
        else:
            arguments.append(word)
    (tmp_path / "log").mkdir(exist_ok=True)
    return [
        str(UNITS / "pkgcache.toml") if word == CONFIG_FILE
        else word.replace("/var/log/pkgcache/", f"{tmp_path}/log/")
        for word in arguments
    ]


#: Where pkgcache.default has the shipped pkgcache.toml installed.
CONFIG_FILE = "/etc/pkgcache.toml"


@pytest.mark.parametrize("sources", examples("PKGCACHE_SOURCES"))
def test_every_sources_example_is_accepted_by_twist_pkgcache(tmp_path, sources):
    """Each example, or (empty, with the mirrors of a file) the shipped pkgcache.toml."""
    from pkgcache.tap import Options

    config = Options()
    config.parseOptions(
        pkgcache_arguments(tmp_path, sources, "" if sources else f"--config {CONFIG_FILE}")
    )
    assert len(config["sources"]) == split_like_systemd(sources).count("--source")
    assert bool(config["mirrors"]) == (not sources)


def test_the_shipped_config_file_serves_every_kind_under_the_units_own_options(tmp_path):
    from pkgcache.tap import Options

    config = Options()
    config.parseOptions(pkgcache_arguments(tmp_path, "", f"--config {CONFIG_FILE}"))
    assert {mirror.name: mirror.kind for mirror in config["mirrors"]} == {
        "debian": "debian", "gentoo": "gentoo", "pypi": "pypi", "npm": "npm",
    }
    assert config["cache-dir"].path == str(tmp_path / "cache")
    assert config["listen"] == ["tcp:0:interface=127.0.0.1"]
    assert (config["min-revalidation-interval"], config["max-cache-size"]) == (60, 50 * 1024**3)


@pytest.mark.parametrize("options", examples("PKGCACHE_OPTIONS"))
def test_every_options_example_is_accepted_by_twist_pkgcache(tmp_path, options):
    from pkgcache.tap import Options

    sources = "" if "--config" in options else examples("PKGCACHE_SOURCES")[0]
    Options().parseOptions(pkgcache_arguments(tmp_path, sources, options))


@pytest.mark.parametrize("options", examples("PKGCACHE_CULL_OPTIONS"))
def test_every_cull_example_is_accepted_by_pkgcache_cull(tmp_path, options):
    from pkgcache.store import SPOOL_DIR_NAME

    cache = tmp_path / "cache"
    # pkgcache-cull only culls a directory pkgcache has marked as its own.
    (cache / SPOOL_DIR_NAME).mkdir(parents=True)
    result = subprocess.run(
        [str(BIN / "pkgcache-cull"), "--cache-dir", str(cache), "--dry-run",
         *split_like_systemd(options)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_documented_overrides_repeat_the_shipped_command_line():
    """
    The drop-ins that README.rst and pkgcache.default suggest must change only
    what they say they change (the program, the socket's domain), or copying
    one would silently drop an argument.
    """
    shipped = exec_start("pkgcache.service")
    documented = [
        line.split("ExecStart=", 1)[1]
        for name in ("README.rst", "pkgcache.default")
        for line in (UNITS / name).read_text(encoding="utf-8").splitlines()
        if re.search(r"ExecStart=\S*twist ", line)
    ]
    assert len(documented) >= 3
    for command in documented:
        argv = shlex.split(command)
        assert Path(argv[0]).name == "twist"
        assert [word.replace("domain=INET:", "domain=INET6:") for word in argv[1:]] == shipped[1:]


def test_the_service_may_hold_many_descriptors():
    # A client holds a socket and a file: 1024 would be a few hundred clients.
    limit = read_unit("pkgcache.service")["Service"]["LimitNOFILE"]
    assert int(limit.split(":")[0]) >= 16384
