"""One module per `nanoseek` subcommand; each defines `register(subparsers)` that sets `func`."""
