"""One scheduled retraining cycle on the cluster this job runs in.

The same code as ``genrecls retrain`` (every flag is the same), joined to the cluster with
``--address auto`` (``ray job submit`` sets ``RAY_ADDRESS``): ingest new and changed
tracks, train a challenger, promote it only if it beats the champion.  The library, the
dataset and the registry must be reachable from every node (a shared path or a
``s3://`` / ``gs://`` URI, see docs/cluster.md).  From cron on a machine that can reach
the dashboard (e.g. the head node itself)::

    0 3 * * * cd /opt/genrecls && ray job submit --address http://127.0.0.1:8265 \\
        --working-dir . -- python jobs/retrain.py /mnt/music \\
        --dataset s3://my-bucket/genrecls/datasets/main --registry s3://my-bucket/genrecls/models

Exit code: the CLI's, except that "champion kept" (or "nothing new"), a normal outcome of
a scheduled run, exits 0 here so that Ray reports the job SUCCEEDED; the decision is
printed in the job's log (``ray job logs ID``) and recorded in the registry
(``genrecls models list REGISTRY``).  Any other non-zero code (failed, bad input, another
retrain holds the lock, no cluster to join) makes the job FAILED.
"""

import sys

from genrecls.cli import run_job
from genrecls.core import ExitCode

if __name__ == "__main__":
    code = run_job("retrain")
    # KEPT: the challenger was not better, or there was nothing new to learn from
    sys.exit(0 if code == ExitCode.KEPT else code)
