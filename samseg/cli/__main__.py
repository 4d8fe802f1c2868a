"""`python -m samseg.cli …`, as the console script (benchmarks and tests run it with a given interpreter)."""

from samseg.cli import main

raise SystemExit(main())
