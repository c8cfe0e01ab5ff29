//! virtio-fs: a host folder shared with the guest, served in-process by our own FUSE
//! passthrough server ([`server`]) over the FUSE wire format ([`protocol`]), on the device's
//! own thread ([`device`]).
//!
//! The server copies request and reply bytes through the queues (no DAX window, no shared
//! memory with another process), so it works the same for a VM whose RAM is a private mapping
//! of a snapshot.

pub mod device;
pub mod protocol;
pub mod server;
pub mod sys;

pub use device::{Fs, TAG_LEN, VIRTIO_ID_FS};
pub use server::{FsError, Server};
