"""Self-supervised methods as wrappers around any registered encoder (feature API only)."""
