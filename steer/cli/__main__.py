"""`python -m steer.cli`: the `steer` command."""
from steer.cli.main import main

main()
