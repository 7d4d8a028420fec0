"""One version: the installed distribution's metadata, `mergekit_nan.__version__` and CHANGELOG.md's newest entry."""

import importlib.metadata
import os
import re

import mergekit_nan

ROOT = os.path.join(os.path.dirname(__file__), "..")


def changelog_versions():
    """The versions of CHANGELOG.md's `## [X.Y.Z] - date` headings, newest (top) first."""
    with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as handle:
        return re.findall(r"^## \[([^\]]+)\] - \d{4}-\d{2}-\d{2}$", handle.read(), flags=re.MULTILINE)


def test_installed_metadata_is_the_package_version():
    installed = importlib.metadata.version("mergekit-nan")
    # an editable install keeps the metadata of its install: a bump needs a reinstall
    assert installed == mergekit_nan.__version__, (
        f"installed metadata says {installed}, mergekit_nan.__version__ {mergekit_nan.__version__}: "
        "reinstall (./scripts/setup.sh)"
    )


def test_changelog_top_entry_is_the_package_version():
    versions = changelog_versions()
    assert versions, "CHANGELOG.md has no '## [X.Y.Z] - YYYY-MM-DD' entry"
    assert versions[0] == mergekit_nan.__version__, f"CHANGELOG.md's newest entry is {versions[0]}"
    assert len(set(versions)) == len(versions), f"a version appears twice in CHANGELOG.md: {versions}"
