"""Probes: measurements that answer the product's density questions from files on disk."""
