//! seccomp-bpf allow-lists per thread kind (placeholder; filled in by the seccomp change).

/// Which filter a thread installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread: `KVM_RUN` and the device emulation it does on MMIO/PIO exits.
    Vcpu,
    /// A device's own thread (the vsock event loop).
    Device,
    /// The worker's main thread: the control channel, snapshots, pause/resume.
    Control,
}

/// Installs the calling thread's filter; does nothing unless filters were prepared (the
/// in-process VMM never filters).
pub fn apply(_kind: ThreadKind) -> Result<(), String> {
    Ok(())
}

/// TEMPORARY stand-ins until the filters land.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    Enforce,
    Log,
}

pub fn prepare(_mode: Mode) -> Result<(), String> {
    Ok(())
}
pub const EXIT_SECCOMP_DENIED: i32 = 159;
