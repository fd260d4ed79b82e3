"""The generated docs say what the code says."""

from __future__ import annotations

import subprocess
import sys

try:
    from data_helpers import REPO
except ImportError:  # tests/ collected as a package
    from tests.data_helpers import REPO


def test_config_reference_is_current():
    """docs/config_reference.md is written from the config dataclasses: a changed key or comment needs a rewrite."""
    proc = subprocess.run([sys.executable, "docs/gen_config_reference.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr + "\nRun: python docs/gen_config_reference.py"


def test_readme_links_point_to_files():
    import re

    text = (REPO / "README.md").read_text()
    missing = [link for link in re.findall(r"\]\(([^)#]+)", text) if "://" not in link and not (REPO / link).exists()]
    assert not missing, missing
