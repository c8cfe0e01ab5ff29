//! supermachine's Rust core.
//!
//! The pure-Rust modules below have no Python dependency and are tested with `cargo test`;
//! the `py` module (feature `python`, enabled by maturin) is the thin binding layer that
//! exposes them as `supermachine._core`.

pub mod cdc;
pub mod devices;
pub mod layers;
pub mod net;
pub mod pages;
pub mod snapshot;
pub mod source;
pub mod vmm;
pub mod worker;

#[cfg(feature = "python")]
mod py;
