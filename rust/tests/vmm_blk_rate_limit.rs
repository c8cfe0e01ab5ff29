//! A disk's rate limit through the real VMM (KVM): an invalid limit is refused as a bad value
//! before the VM runs, and a limited disk's timer thread lives exactly as long as its VM.
//! (The throttling itself is tested against the device in `devices::virtio::block`.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use supermachine_core::devices::rate_limiter::RateLimit;
use supermachine_core::vmm::builder::ErrorClass;
use supermachine_core::vmm::{BootSource, DiskConfig, MachineConfig, RawMode, Vmm};

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("sm-ratelimit-{}-{name}", std::process::id()))
}

/// Threads of this process named like the disk rate-limit thread.
fn rate_limit_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "blk-ratelimit")
        .count()
}

fn config(guest: &Path, disk: &Path, limit: RateLimit) -> MachineConfig {
    let mut c = MachineConfig::new(BootSource::Raw {
        path: guest.to_path_buf(),
        load_addr: 0x10_0000,
        mode: RawMode::Long,
    });
    c.memory_mib = 16;
    c.disks.push(DiskConfig {
        path: disk.to_path_buf(),
        read_only: false,
        rate_limit: Some(limit),
    });
    c
}

#[test]
fn rate_limited_disk_in_a_real_vm() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    // cli; hlt; jmp back to hlt: the guest idles until it is stopped.
    let guest = temp("guest.bin");
    std::fs::write(&guest, [0xfa, 0xf4, 0xeb, 0xfd]).unwrap();
    let disk = temp("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();

    let bad = RateLimit {
        ops_per_sec: Some(0),
        ..RateLimit::default()
    };
    let err = Vmm::start(&config(&guest, &disk, bad)).err().unwrap();
    assert_eq!(err.class(), ErrorClass::Value);
    assert!(
        err.to_string()
            .ends_with("ops_per_sec is 0, but it must be between 1 and 10000000"),
        "{err}"
    );
    assert_eq!(rate_limit_threads(), 0);

    let good = RateLimit {
        bytes_per_sec: Some(8 << 20),
        ops_per_sec: Some(1000),
        ..RateLimit::default()
    };
    let vmm = Vmm::start(&config(&guest, &disk, good)).unwrap();
    // A new thread names itself once it runs: give it that moment (bounded).
    for _ in 0..500 {
        if rate_limit_threads() == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(rate_limit_threads(), 1);
    assert_eq!(vmm.wait(Some(Duration::from_millis(50))), None);
    vmm.stop();
    assert_eq!(rate_limit_threads(), 0, "stop joins the disk's thread");
    drop(vmm);
    std::fs::remove_file(guest).unwrap();
    std::fs::remove_file(disk).unwrap();
}
