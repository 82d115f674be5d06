"""``python -m mqlite``: see :mod:`mqlite.cli`."""

from mqlite.cli import main

raise SystemExit(main())
