"""Stand-in for ansible-test's get-pip bootstrap script on machines that only reach package indexes.

ansible-test runs it as ``get_pip.py <pip install options> pip==X``; it installs
the requested pip with the pip wheel that Python's ensurepip bundles.
"""

import ensurepip
import glob
import os
import sys

# get-pip.py's own switches; the fresh virtualenv must simply not get these packages.
OWN_OPTIONS = {"--no-setuptools", "--no-wheel"}

wheel = sorted(glob.glob(os.path.join(os.path.dirname(ensurepip.__file__), "_bundled", "pip-*.whl")))[-1]
sys.path.insert(0, wheel)

from pip._internal.cli.main import main  # noqa: E402

sys.exit(main(["install", "--upgrade", *[arg for arg in sys.argv[1:] if arg not in OWN_OPTIONS]]))
