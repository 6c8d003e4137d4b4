"""The web UI of `ec serve` (see :mod:`eclens.web.server`)."""
