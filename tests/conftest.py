import atexit
import os
import shutil
import sys
import tempfile

import pytest

# Tests never reach a model hub; tiny checkpoints are built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))
# The norm cache of every merge the suite runs (subprocesses included) is its own, never
# the user's; tests that look at the cache itself point merges at their own folders.
os.environ["MERGEKIT_NAN_NORM_CACHE"] = tempfile.mkdtemp(prefix="mergekit-nan-norm-cache-")
atexit.register(shutil.rmtree, os.environ["MERGEKIT_NAN_NORM_CACHE"], True)

from merging import INSPECT_RECORD_FILENAME, load_record  # noqa: E402  (needs the path above)

from mergekit_nan.core.record import RECORD_FILENAME  # noqa: E402


@pytest.fixture(scope="session")
def checked_records():
    """Record files already validated -> their (mtime, size) at that time."""
    return {}


@pytest.fixture(autouse=True)
def written_records_follow_the_schema(tmp_path_factory, checked_records):
    """After each test, every record file under pytest's temporary folders that is new or
    changed since the last check must validate: so no record a merge or `inspect` writes
    in the suite escapes, module fixtures' ones included (they are checked after the first
    test that uses them)."""
    yield
    for folder, _, names in os.walk(tmp_path_factory.getbasetemp()):
        for name in {RECORD_FILENAME, INSPECT_RECORD_FILENAME}.intersection(names):
            path = os.path.join(folder, name)
            stamp = os.stat(path)
            if checked_records.get(path) != (stamp.st_mtime_ns, stamp.st_size):
                # marked first, so that a broken file fails one test, not every later one
                checked_records[path] = (stamp.st_mtime_ns, stamp.st_size)
                load_record(path)
