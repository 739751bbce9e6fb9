"""Configuration, logging, the exception tree, identifiers and the clock."""
