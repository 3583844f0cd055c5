"""Indexing: walk folders, decode images in threads, embed in batches, keep the catalog and vector store in sync."""
