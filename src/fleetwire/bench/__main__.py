"""`python -m fleetwire.bench SCENARIO …` is `fleetwire bench SCENARIO …`."""

from fleetwire.bench.run import main

raise SystemExit(main())
