"""``python -m training``: see :mod:`training.cli`."""

from .cli import main

raise SystemExit(main())
