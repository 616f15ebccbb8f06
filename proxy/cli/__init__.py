"""The command line: click commands, the demo, and the only place that exits."""
