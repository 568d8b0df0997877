"""``python -m mtpeft`` (and ``accelerate launch -m mtpeft train …``)."""

import sys

from mtpeft.cli import main

sys.exit(main())
