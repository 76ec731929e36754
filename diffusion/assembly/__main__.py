"""``python -m mmskip.diffusion.assembly``: the model-assembly recipe (see :mod:`.recipe`)."""

import sys

from .recipe import main

sys.exit(main())
