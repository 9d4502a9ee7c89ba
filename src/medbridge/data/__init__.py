"""Data: image reading, datasets, focal views."""
