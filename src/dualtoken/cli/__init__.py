"""The ``dualtoken`` command line: argument parsing and error reporting; every command calls the Python API."""
