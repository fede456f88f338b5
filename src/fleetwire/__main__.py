"""`python -m fleetwire` is the `fleetwire` command."""

from fleetwire.cli import main

raise SystemExit(main())
