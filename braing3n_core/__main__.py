"""`python -m braing3n_core`: the `braing3n` command, for machines where the script is not on PATH."""

import sys

from braing3n_core.cli import main

sys.exit(main())
