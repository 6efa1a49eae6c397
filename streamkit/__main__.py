"""``python -m streamkit``: see :mod:`streamkit.cli`."""

from streamkit.cli import main

raise SystemExit(main())
