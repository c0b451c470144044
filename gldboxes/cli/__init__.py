"""The ``gldboxes`` command: one subcommand per stage, dispatched to each package's CLI module."""
