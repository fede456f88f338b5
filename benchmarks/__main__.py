"""`python -m benchmarks SCENARIO …` is `fleetwire bench SCENARIO …`."""

from benchmarks.run import main

raise SystemExit(main())
