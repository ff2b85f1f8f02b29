"""`python -m vlmtrain ...` (what `torchrun -m vlmtrain` runs)."""

from vlmtrain.cli.main import main

raise SystemExit(main())
