//! Resource limits per VM (placeholder).
