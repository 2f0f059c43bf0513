"""One small module per resource; each only translates HTTP to a core call and back."""
