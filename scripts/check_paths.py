"""Fail on paths that exist only on one machine: the tests, docs and code must work from a clone of this repository alone.

Flags, in every file git tracks or would track (untracked ones it does not ignore):
- a reference to ../shared, a folder beside a development checkout that a user's clone does not have;
- an absolute path under /work, or a home directory (/root, /home/<user>) of the machine that wrote it.

Paths inside the images the lab builds are the images' own, not a machine's: the files under lab/images/ and the
TorchServe image's home, /home/model-server (the official image's), are not flagged as home directories.
Usage: python scripts/check_paths.py [REPO]; exit 1 with one line per finding, file:line: what and the fix.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SHARED = re.compile(r"\.\./shared\b")
WORK = re.compile(r"(?<![\w.$/-])/work(?=/|\b)")
# A home directory at the start of a path: not a URL's //root@, not $ROOTFS/root, not ~/...
HOME = re.compile(r"(?<![\w.$/-])/(?:root|home/(?!model-server\b)[A-Za-z0-9_.-]+)(?=/|\b)")
IMAGE_FILES = "lab/images/"
# This file names what it looks for.
SELF = "scripts/check_paths.py"


def tracked_files(repo: Path) -> list[str]:
    listing = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True, check=True).stdout
    return sorted({name for name in listing.decode("utf-8", "surrogateescape").split("\0") if name})


def findings(repo: Path) -> list[str]:
    found = []
    for name in tracked_files(repo):
        path = repo / name
        if name == SELF or not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
            if SHARED.search(line):
                found.append(f"{name}:{number}: names ../shared, which a clone of this repository does not have; keep what it needs in the repository")
            if WORK.search(line):
                found.append(f"{name}:{number}: names an absolute /work path of one machine; use a path relative to the repository")
            if not name.startswith(IMAGE_FILES) and (match := HOME.search(line)):
                found.append(f"{name}:{number}: names the home directory {match.group(0)} of one machine; use $HOME, ~ or a path relative to the repository")
    return found


def main(argv: list[str]) -> int:
    repo = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1]
    problems = findings(repo)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
