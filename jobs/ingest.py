"""Ingest a library into Parquet shards on the Ray cluster this job runs in.

The same code as ``genrecls ingest`` (every flag is the same), joined to the cluster with
``--address auto``: ``ray job submit`` sets ``RAY_ADDRESS`` for the job, and on a head node
``auto`` finds the running cluster.  The ingest tasks spread over every node; each writes
its shard straight to DATASET, so DATASET (and the library) must be reachable from every
node: a shared file system path or a ``s3://`` / ``gs://`` URI (see docs/cluster.md).

Submit from a checkout, with the dashboard reached through ``ray dashboard cluster.yaml``
(or an SSH tunnel to the head's 127.0.0.1:8265)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/ingest.py /mnt/music --out s3://my-bucket/genrecls/datasets/main

Exit codes: the CLI's table (``genrecls/exitcodes.py``, README): 0 done (bad files are recorded
in DATASET/failures/, not fatal), 1 some files failed under ``--strict``, 2 bad input or no
cluster to join, 4 DATASET is locked by another run.  Ray marks the job FAILED on
any non-zero code.  Run ``python jobs/ingest.py --help`` for every flag.
"""

import sys

from genrecls.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("ingest"))
