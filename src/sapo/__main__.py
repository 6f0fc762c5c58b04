"""`python -m sapo ...` (and so `accelerate launch -m sapo train ...`) runs the `sapo` command."""

from sapo.cli import main

raise SystemExit(main())
