"""Training recipes for the toy world: ``python -m toy_models.recipes.<name> --help``."""
