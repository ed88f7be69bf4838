"""codetr."""
