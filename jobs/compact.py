"""``genrecls compact`` as a job: the same code and flags (``python jobs/compact.py --help``).

It starts no Ray task (the work is the driver's: reading and writing the dataset's index and
files), so it runs where it is started: on the head with ``ray job submit --working-dir . --
python jobs/compact.py DATASET ...``, or anywhere that reaches DATASET.  Exit codes: the CLI's.
"""

import sys

from genrecls.cli import main

if __name__ == "__main__":
    sys.exit(main(["compact", *sys.argv[1:]]))
