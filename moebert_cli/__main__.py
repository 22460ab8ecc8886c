"""`python -m moebert_cli` is `moebert` (torchrun -m moebert_cli … runs the training commands on every rank)."""

import sys

from moebert_cli import main

sys.exit(main())
