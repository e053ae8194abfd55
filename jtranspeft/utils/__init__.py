"""Building blocks with no model knowledge: typed YAML configs, errors and exit codes, output files, progress,
the host allocator's huge pages."""
