"""Second-opinion records aggregator: the core, with no knowledge of any one protocol."""

__version__ = "0.1.0"
