"""lab/lib.sh's apt_mirror reads the Debian mirror from apt's own configuration.

Image builds must go wherever this machine's apt goes, so the parser is tested
on the source formats apt accepts, including the ones it must skip.
"""

import subprocess
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[2] / "lab" / "lib.sh"


def apt_mirror(apt_etc: Path, suite: str = "bookworm", env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(apt_etc), "MLFLEET_APT_ETC": str(apt_etc), **(env_extra or {})}
    return subprocess.run(["bash", "-c", f'. "{LIB}" && apt_mirror {suite}'], capture_output=True, text=True, env=env, check=False)


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_deb822_picks_the_stanza_of_the_suite_not_security(tmp_path):
    write(
        tmp_path,
        "sources.list.d/debian.sources",
        "Types: deb\n"
        "URIs: http://security.example.invalid/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n"
        "\n"
        "Types: deb\n"
        "# a comment inside the stanza\n"
        "URIs: http://mirror.example.invalid/debian http://second.example.invalid/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n",
    )
    result = apt_mirror(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "http://mirror.example.invalid/debian"


def test_deb822_skips_source_only_and_disabled_stanzas(tmp_path):
    write(
        tmp_path,
        "sources.list.d/debian.sources",
        "Types: deb-src\nURIs: http://src.example.invalid/debian\nSuites: bookworm\n\n"
        "Enabled: no\nTypes: deb\nURIs: http://off.example.invalid/debian\nSuites: bookworm\n\n"
        "Types: deb deb-src\nURIs: http://on.example.invalid/debian\nSuites: bookworm\n",
    )
    assert apt_mirror(tmp_path).stdout.strip() == "http://on.example.invalid/debian"


def test_one_line_format_with_options(tmp_path):
    write(
        tmp_path,
        "sources.list",
        "# deb http://commented.example.invalid/debian bookworm main\n"
        "deb-src http://src.example.invalid/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://line.example.invalid/debian bookworm main\n",
    )
    assert apt_mirror(tmp_path).stdout.strip() == "http://line.example.invalid/debian"


@pytest.mark.parametrize("suite", ["bookworm", "trixie"])
def test_no_source_for_the_suite_is_an_error_naming_it(tmp_path, suite):
    write(tmp_path, "sources.list", "deb http://other.example.invalid/debian bullseye main\n")
    result = apt_mirror(tmp_path, suite)
    assert result.returncode != 0
    assert f"no apt source for suite '{suite}'" in result.stderr
    assert "MLFLEET_LAB_MIRROR" in result.stderr


def test_explicit_mirror_overrides_apt(tmp_path):
    write(tmp_path, "sources.list", "deb http://line.example.invalid/debian bookworm main\n")
    result = apt_mirror(tmp_path, env_extra={"MLFLEET_LAB_MIRROR": "http://override.example.invalid/debian"})
    assert result.stdout.strip() == "http://override.example.invalid/debian"
