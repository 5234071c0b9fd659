"""The ``codegemm`` command line: thin parsers that call the library."""
