"""`python -m ame_hf` runs the `ame-hf` command line (also under `torchrun ... -m ame_hf`)."""

import sys

from .cli import main

sys.exit(main())
