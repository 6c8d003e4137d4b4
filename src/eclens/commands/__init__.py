"""CLI commands, one module per step; :mod:`eclens.cli` imports every module here."""
