"""Command-line entry points: one module per command, each with ``main(argv) -> exit code``, which is
``_run.run(PROG, body)``: one table from errors to exit codes and one error line for every command.

``COMMANDS`` maps the sub-command names of ``python -m fastebm COMMAND`` to those modules.
"""
# Each is also installed as the console script fastebm-NAME.
COMMANDS = {"train": "fastebm.cli.train", "eval": "fastebm.cli.eval", "export": "fastebm.cli.export",
            "restore": "fastebm.cli.restore", "score": "fastebm.cli.score"}
