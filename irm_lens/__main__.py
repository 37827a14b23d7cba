"""``python -m irm_lens``: the same as the ``irm-lens`` command."""

import sys

from irm_lens.cli import main

sys.exit(main())
