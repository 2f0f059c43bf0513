"""Connectors: one module per protocol, each registered under the ``aggregator.connectors`` entry point."""
