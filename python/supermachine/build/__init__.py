"""Dockerfile builds: parse, select the context, run each step in a microVM, cache and store the result."""

from __future__ import annotations
