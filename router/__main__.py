"""`python -m router` is `support-router`."""

from router.cli import main

raise SystemExit(main())
