"""Command-line entry points: one module per command, each with ``main(argv) -> exit code``.

``COMMANDS`` maps the sub-command names of ``python -m fastebm COMMAND`` to those modules.
"""
COMMANDS = {"train": "fastebm.cli.train"}  # also installed as the console script fastebm-train
