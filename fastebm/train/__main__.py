"""``python -m fastebm.train`` == ``fastebm-train``."""
import sys

from ..cli.train import main

sys.exit(main())
