"""`python -m clients.batch`: the charrnn-batch command."""

import sys

from clients.batch.cli import main

sys.exit(main())
