//! One VMM process per VM: the worker executable (`supermachine-vmm`), the typed control
//! channel between it and its owner, and the protections it runs under.
//!
//! - [`protocol`]: versioned request/response messages and their framing (with descriptors).
//! - [`client`]: spawns a worker and drives it (used by the Python binding).
//! - [`server`]: the worker's side: builds the VM, enters the jail, serves requests.
//! - [`jail`]: namespaces, `pivot_root`, privilege drop.
//! - [`landlock`]: a Landlock ruleset granting no file or TCP access, per thread.
//! - [`seccomp`]: one seccomp-bpf allow-list per thread kind.
//! - [`cgroup`]: per-VM resource limits (cgroup v2, or v1 controllers where v2 has none).
//! - [`host`]: what this host supports (for `supermachine doctor` and the jail's choices).

pub mod cgroup;
pub mod client;
pub mod console_ring;
pub mod host;
pub mod jail;
pub mod landlock;
pub mod protocol;
pub mod seccomp;
pub mod server;
pub mod spawn;
