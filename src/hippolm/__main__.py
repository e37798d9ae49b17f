"""``python -m hippolm ...``: the command line of :mod:`hippolm.cli`."""

from .cli import main

raise SystemExit(main())
