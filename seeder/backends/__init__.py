"""Origin backends, one module per URL scheme."""
