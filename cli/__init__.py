"""The `steer` command line (click): one module per command group, all registered in :mod:`steer.cli.main`."""
