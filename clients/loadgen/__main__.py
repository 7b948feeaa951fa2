"""`python -m clients.loadgen`: the charrnn-loadgen command."""

import sys

from clients.loadgen.cli import main

sys.exit(main())
