"""`python -m steer.cli`: the `steer` command."""
from steer.cli.main import main

if __name__ == "__main__":  # not in the processes vLLM spawns, which import this module again
    main()
