"""``python -m zmesh``: the command line."""

from zmesh.cli import main

raise SystemExit(main())
