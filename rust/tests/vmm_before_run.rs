//! The `before_run` hook of `Vmm::start_with` and `Vmm::restore_with` runs once everything is
//! built and every vCPU thread exists, before the guest executes a single instruction; when it
//! fails, the start fails with its error and leaves no VMM thread behind.
//!
//! One test function: it counts this process's threads by name, so no other VM may run
//! alongside it (integration tests get a process of their own).

mod kvm_support;

use kvm_support::kvm_usable;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use supermachine_core::vmm::persist::RestoreOverrides;
use supermachine_core::vmm::{BootSource, MachineConfig, RawMode, Vmm, VmmError};

/// Real mode at 0x7c00: write 'X' to COM1, then spin.
const GUEST: &[u8] = &[
    0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'X', // mov al, 'X'
    0xee, // out dx, al
    0xeb, 0xfe, // jmp $
];

/// How many threads this process has.
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Names of this process's threads whose name starts with one of `prefixes`.
fn threads_named(prefixes: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let comm = task.unwrap().path().join("comm");
        // A thread that ended since the listing has no comm any more.
        if let Ok(name) = std::fs::read_to_string(comm) {
            let name = name.trim().to_string();
            if prefixes.iter().any(|p| name.starts_with(p)) {
                out.push(name);
            }
        }
    }
    out.sort();
    out
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn config(dir: &Path, vcpus: u8) -> MachineConfig {
    let mut cfg = MachineConfig::new(BootSource::Raw {
        path: dir.join("guest.bin"),
        load_addr: 0x7c00,
        mode: RawMode::Real,
    });
    cfg.memory_mib = 16;
    cfg.vcpus = vcpus;
    cfg
}

/// A hook that checks nothing of the guest has run yet: no console output in `log` (and none
/// appears while it waits a little, so a vCPU running concurrently would be caught), and that
/// the VM's `threads` exist (a fresh thread names itself, so names may not be set yet). Records
/// when it ran.
fn observing_hook(
    log: PathBuf,
    threads: usize,
    ran_at: &mut Option<Instant>,
) -> impl FnMut() -> Result<(), VmmError> + '_ {
    let before = thread_count();
    move || {
        assert!(ran_at.is_none(), "the hook ran twice");
        for _ in 0..20 {
            assert_eq!(
                std::fs::read(&log).unwrap(),
                b"",
                "the guest ran before the hook"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(thread_count(), before + threads);
        *ran_at = Some(Instant::now());
        Ok(())
    }
}

/// A hook that fails, after checking that the VM's `threads` exist when it runs.
fn failing_hook(threads: usize) -> impl FnMut() -> Result<(), VmmError> {
    let before = thread_count();
    move || {
        assert_eq!(thread_count(), before + threads);
        Err(VmmError::Setup("the test's hook refused".into()))
    }
}

/// `result` is the failing hook's error, and the process has its `baseline` threads again.
fn assert_refused(result: Result<Vmm, VmmError>, baseline: usize) {
    match result {
        Ok(_) => panic!("the VM started although its before_run hook failed"),
        Err(e) => assert_eq!(e.to_string(), "the test's hook refused"),
    }
    assert_eq!(threads_named(&["vcpu", "vsock"]), Vec::<String>::new());
    assert_eq!(
        thread_count(),
        baseline,
        "a VMM thread outlived the failed start"
    );
}

#[test]
fn before_run_runs_before_the_first_kvm_run() {
    if !kvm_usable() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("sm-before-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("guest.bin"), GUEST).unwrap();
    let snap = dir.join("snap");
    let baseline = thread_count();

    // Boot: the hook runs once, before vCPU 0 first enters KVM_RUN; then the guest runs.
    {
        let mut cfg = config(&dir, 1);
        let log = dir.join("boot.log");
        cfg.console_log = Some(log.clone());
        let mut ran_at = None;
        let vmm = Vmm::start_with(&cfg, &mut observing_hook(log.clone(), 1, &mut ran_at)).unwrap();
        let ran_at = ran_at.expect("the hook did not run");
        wait_for("the guest's console byte", || vmm.console() == b"X");
        let first_run = vmm.times().first_run.expect("vCPU 0 never ran");
        assert!(
            ran_at < first_run,
            "vCPU 0 entered KVM_RUN before the hook returned"
        );
        assert!(ran_at <= vmm.times().running);
        assert_eq!(std::fs::read(&log).unwrap(), b"X");
        vmm.snapshot(&snap, None).unwrap();
    }

    // Restore: the same, on the restore path.
    {
        let log = dir.join("restore.log");
        let overrides = RestoreOverrides {
            console_log: Some(log.clone()),
            ..Default::default()
        };
        let mut ran_at = None;
        let vmm =
            Vmm::restore_with(&snap, &overrides, &mut observing_hook(log, 1, &mut ran_at)).unwrap();
        let ran_at = ran_at.expect("the hook did not run");
        wait_for("vCPU 0's first KVM_RUN", || vmm.times().first_run.is_some());
        assert!(ran_at < vmm.times().first_run.unwrap());
        assert_eq!(vmm.phases().last().map(|p| p.0), Some("running"));
        assert_eq!(vmm.outcome(), None);
    }
    assert_eq!(thread_count(), baseline);

    // A failing hook fails the start with its error, stopping every vCPU thread and the vsock
    // device's thread it had (two vCPUs and vsock: three threads).
    let vsock = dir.join("vsock.sock");
    let mut cfg = config(&dir, 2);
    cfg.vsock_path = Some(vsock.clone());
    assert_refused(Vmm::start_with(&cfg, &mut failing_hook(3)), baseline);
    assert!(
        !vsock.exists(),
        "the vsock socket outlived the failed start"
    );
    assert_refused(
        Vmm::restore_with(&snap, &RestoreOverrides::default(), &mut failing_hook(1)),
        baseline,
    );

    std::fs::remove_dir_all(&dir).unwrap();
}
