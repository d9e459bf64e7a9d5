import sys

from genrecls.cli import main

sys.exit(main())
