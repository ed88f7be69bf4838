"""codetr: Co-DETR (collaborative hybrid assignments training) and the DETR family, as pluggable components."""

__version__ = "0.1.0"
