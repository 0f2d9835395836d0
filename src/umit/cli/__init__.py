"""Command-line entry points: one module per subcommand, each calling an importable ``run(cfg)``."""
