"""Entry point: ``python -m bench [--quick]`` prints one markdown table (see bench/README.md)."""

from bench.run import main

raise SystemExit(main())
