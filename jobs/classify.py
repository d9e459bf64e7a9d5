"""Classify a library with a trained run on the Ray cluster this job runs in.

The same code as ``genrecls classify`` (every flag is the same), joined to the cluster with
``--address auto``: ``ray job submit`` sets ``RAY_ADDRESS`` for the job, and on a head node
``auto`` finds the running cluster.  Decoding runs as Ray Data tasks on every node and the
model in long-lived actors (``--gpu`` puts them on GPUs, ``--actors N`` sets how many), so
the library and RUN must be reachable from every node (a shared file system path or a
``s3://`` / ``gs://`` URI); the predictions are written by this driver to PREDICTIONS.

Submit from a checkout, with the dashboard reached through ``ray dashboard cluster.yaml``
(or an SSH tunnel to the head's 127.0.0.1:8265)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/classify.py /mnt/music --model s3://my-bucket/genrecls/registry \\
            --out s3://my-bucket/genrecls/predictions/main --gpu --actors 4 --csv

Exit codes: the CLI's table (``genrecls/exitcodes.py``, README): 0 done (bad files are recorded
in PREDICTIONS/failures/, not fatal), 1 some files could not be classified under ``--strict``,
2 bad input or no cluster to join, 4 PREDICTIONS is locked by another run.  Run
``python jobs/classify.py --help`` for every flag.
"""

import sys

from genrecls.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("classify"))
