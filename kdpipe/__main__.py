"""``python -m kdpipe`` (what ``torchrun -m kdpipe`` runs)."""

from kdpipe.cli import main

main()
