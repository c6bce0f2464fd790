"""``python -m cli``: the ``swarm`` command line, as the console script starts it."""

from cli.entry import main

main()
