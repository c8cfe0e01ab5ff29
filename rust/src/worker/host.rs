//! Host capability probes (placeholder).
