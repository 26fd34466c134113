"""Data: dataset adapters, the normalised manifest, splits, the demo dataset, the torch dataset, validation."""
