"""The `steer` command line (click): one module per command group, all registered in :mod:`steer.cli.main`."""

if __name__ == "cli":  # imported from a clone's root, where this folder would shadow an installed `cli`
    from steer.shadowing import yield_to_installed

    yield_to_installed(__name__, __file__)
