"""QFM-IQM."""
