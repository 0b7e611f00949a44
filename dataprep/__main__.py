"""`python -m dataprep --source ...`: build a data directory (dataprep.build.main)."""

import sys

from dataprep.build import main

sys.exit(main())
