//! What the integration tests that run real VMs share.

/// Whether `/dev/kvm` can be opened for reading and writing; says why on stderr when not, so a
/// test that returns early on a host without KVM is seen as skipped.
pub fn kvm_usable() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped: /dev/kvm is not usable here ({e})");
            false
        }
    }
}
