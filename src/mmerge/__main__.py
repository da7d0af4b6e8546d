"""`python -m mmerge` runs the command line."""

from mmerge.cli import main

main()
