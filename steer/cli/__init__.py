"""The `steer` command line (`main`): subcommands over the Python API.

`main.py` holds find-experts, score and info; `generate.py` and `study.py` add their own
subcommands. Nothing below imports from here.
"""
from steer.cli.main import main, parser

__all__ = ["main", "parser"]
