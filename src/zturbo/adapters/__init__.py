"""Adapters that change the transformer per request: LoRA files (formats, library) and merging."""
