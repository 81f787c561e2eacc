"""The ``medmeta`` command line: thin wrappers over the library's API modules."""
