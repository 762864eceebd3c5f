"""`python -m fleet`: see fleet/cli.py."""
from fleet.cli import main

raise SystemExit(main())
