"""`python -m skyt1.sample ...` (what torchrun runs: one replica per GPU, see cli.py)."""
import sys

from skyt1.sample.cli import main

sys.exit(main())
