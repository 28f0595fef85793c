"""`python -m gateway` is the `tollway` command."""

import sys

from gateway.cli import main

sys.exit(main())
