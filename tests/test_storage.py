"""Output locations: paths and URIs, children of URIs with a query, atomic writes."""

import os

import pyarrow.fs as pafs

from genrecls.storage.location import Location
from genrecls.storage.locks import folder_lock


def test_local_path_and_file_uri_are_the_same_location(tmp_path):
    a, b = Location.parse(str(tmp_path)), Location.parse(f"file://{tmp_path}")
    assert a.root == b.root == str(tmp_path) and a.is_local and b.is_local
    assert a.child("parts").root == b.child("parts").root == str(tmp_path / "parts")


def test_child_of_a_uri_keeps_its_query_at_the_end():
    # an S3-compatible store named in the URI (no network is touched: the region is given)
    loc = Location.parse("s3://bucket/data?region=us-east-1&endpoint_override=localhost:9000&scheme=http")
    child = loc.child("parts", "part-1.parquet")
    assert child.root == "bucket/data/parts/part-1.parquet"
    assert child.uri == "s3://bucket/data/parts/part-1.parquet?region=us-east-1&endpoint_override=localhost:9000&scheme=http"
    again = Location.parse(child.uri)  # what a worker does with a URI it was given
    assert again.root == child.root and isinstance(again.fs, pafs.S3FileSystem)
    assert Location.parse("s3://bucket?region=us-east-1").child("x").uri == "s3://bucket/x?region=us-east-1"


def test_write_text_is_atomic_and_leaves_no_temporary(tmp_path):
    loc = Location.parse(str(tmp_path))
    loc.write_text("a/config.json", "{}\n")
    loc.write_text("a/config.json", '{"v": 2}\n')  # replaced whole
    assert (tmp_path / "a" / "config.json").read_text() == '{"v": 2}\n'
    assert os.listdir(tmp_path / "a") == ["config.json"]


def test_a_failed_writer_leaves_nothing(tmp_path):
    import pytest

    loc = Location.parse(str(tmp_path))

    def fail(out):
        out.write(b"half")
        raise RuntimeError("half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        loc.write_atomic("shards/part-1.parquet", fail)
    assert os.listdir(tmp_path / "shards") == []


def test_local_lock_excludes_names_its_holder_and_dies_with_it(tmp_path):
    import signal
    import subprocess
    import sys

    import pytest

    from genrecls.storage.locks import LockedError

    loc = Location.parse(str(tmp_path / "out"))
    with folder_lock(loc, "first"):
        with pytest.raises(LockedError, match=rf"in use by first \(pid {os.getpid()} on "):
            with folder_lock(loc, "second"):
                pass
    with folder_lock(loc, "third"):  # released
        pass
    # a holder killed with SIGKILL leaves no stale lock: the kernel drops its flock
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom genrecls.storage.location import Location\nfrom genrecls.storage.locks import folder_lock\n"
        "with folder_lock(Location.parse(sys.argv[1]), 'killed holder'):\n"
        "    print('held', flush=True); time.sleep(600)\n"), loc.uri], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"in use by killed holder \(pid {holder.pid} "):
            with folder_lock(loc, "fourth"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with folder_lock(loc, "fifth"):
        pass
