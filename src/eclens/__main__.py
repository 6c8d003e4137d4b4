from eclens.cli import entry

entry()
