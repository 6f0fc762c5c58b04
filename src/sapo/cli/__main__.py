"""`python -m sapo.cli ...` runs the `sapo` command (as `python -m sapo` does)."""

from sapo.cli.commands import main

raise SystemExit(main())
