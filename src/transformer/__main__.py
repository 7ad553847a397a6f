"""`python -m transformer ...` (and `torchrun -m transformer ...`) run the CLI."""

from .cli import main

raise SystemExit(main())
