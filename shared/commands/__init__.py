"""One module per ``freeze-parity`` subcommand: ``add_parser(parser)`` and ``run(args)``."""
