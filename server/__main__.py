"""python -m server: same as charrnn-server."""

import sys

from server.main import main

sys.exit(main())
