"""``python -m mosaic``: the doctor (:mod:`mosaic.doctor`)."""

import sys

from .doctor import main

sys.exit(main())
