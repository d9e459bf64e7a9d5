"""Train a genre classifier on a dataset with Ray Train, on the cluster this job runs in.

The same code as ``genrecls train`` (every flag is the same), joined to the cluster with
``--address auto`` (``ray job submit`` sets ``RAY_ADDRESS``).  The training workers read
the dataset's shards through Ray Data, so DATASET and the run folder must be reachable
from every node: a shared file system path or a ``s3://`` / ``gs://`` URI
(see docs/cluster.md)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train.py s3://my-bucket/genrecls/datasets/main \\
        --out s3://my-bucket/genrecls/runs/2025-06-01

Exit codes: the CLI's table (``genrecls/exitcodes.py``, README): 0 trained, 1 training failed,
2 bad input or no cluster to join, 4 RUN is locked by another run (Ray marks the job FAILED on any
non-zero code).  Run ``python jobs/train.py --help`` for every flag.
"""

import sys

from genrecls.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("train"))
