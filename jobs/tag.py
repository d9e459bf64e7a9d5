"""Write predicted genres into the library's files (or undo a run) on the Ray cluster this job runs in.

The same code as ``genrecls tag`` (every flag is the same), joined to the cluster with
``--address auto``.  The library must be mounted at the same path on every node (the path in
PREDICTIONS/classify.json); PREDICTIONS may be a URI (``s3://``), where the journal is written.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/tag.py s3://my-bucket/genrecls/predictions/main --apply --keep-mtime

Exit codes: the CLI's table (``genrecls/exitcodes.py``): 0 done, 1 files failed under
``--strict``, 2 bad input or no cluster to join, 4 PREDICTIONS is locked by another run.
"""

import sys

from genrecls.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("tag"))
