//! The seccomp filters on real threads: allowed calls work, a forbidden one ends the process with
//! the diagnostic line and exit status 159, and a raw guest runs to power-off with its vCPU and
//! vsock threads filtered and driven (pause, resume, stop) from a thread under the control list.
//!
//! Anything that may end the process runs in a child: the test binary re-executes itself with
//! `SECCOMP_CHILD=<case>` and only the named test, which then runs that case instead of spawning.

mod kvm_support;

use kvm_support::kvm_usable;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use supermachine_core::vmm::{BootSource, MachineConfig, Outcome, RawMode, Vmm};
use supermachine_core::worker::seccomp::{self, Mode, ThreadKind, EXIT_SECCOMP_DENIED};

const CHILD_ENV: &str = "SECCOMP_CHILD";

/// Runs `case` of test `test` in a fresh process; returns its output.
fn child(test: &str, case: &str) -> Output {
    let exe = std::env::current_exe().expect("test binary path");
    Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, case)
        .output()
        .expect("re-run the test binary")
}

fn child_case() -> Option<String> {
    std::env::var(CHILD_ENV).ok()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `f` on a new thread named `name` that first installs the `kind` filter; returns what
/// `f` returned (the thread must survive for that).
fn filtered<T: Send + 'static>(
    name: &str,
    kind: ThreadKind,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            seccomp::apply(kind).expect("install the filter");
            f()
        })
        .expect("spawn")
        .join()
        .expect("the filtered thread panicked")
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The calls of one denied-call case, each made on a thread of the kind it names.
fn run_denied_case(case: &str) {
    let mode = if case.starts_with("log-") {
        Mode::Log
    } else {
        Mode::Enforce
    };
    seccomp::prepare(mode, None).expect("prepare");
    let path = c"/etc/hostname";
    match case {
        "vcpu-openat" | "log-vcpu-openat" => filtered("vcpu0", ThreadKind::Vcpu, move || {
            // SAFETY: a valid NUL-terminated path; the descriptor is closed if one comes back.
            let fd = unsafe { libc::openat(libc::AT_FDCWD, path.as_ptr(), libc::O_RDONLY) };
            if fd >= 0 {
                // SAFETY: fd was just opened here.
                unsafe { libc::close(fd) };
            }
        }),
        "device-socket-inet" => filtered("vsock", ThreadKind::Device, || {
            // SAFETY: socket takes no pointers.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        }),
        "device-socket-unix" => filtered("vsock", ThreadKind::Device, || {
            // SAFETY: socket takes no pointers.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            assert!(fd >= 0, "AF_UNIX socket refused: errno {}", errno());
            // SAFETY: fd was just created here.
            unsafe { libc::close(fd) };
        }),
        "control-execve" => filtered("control", ThreadKind::Control, move || {
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: NUL-terminated path and NULL-terminated argument and environment arrays.
            unsafe { libc::execve(argv[0], argv.as_ptr(), envp.as_ptr()) };
        }),
        "vcpu-mmap-exec" => filtered("vcpu1", ThreadKind::Vcpu, || {
            // SAFETY: an anonymous mapping at an address of the kernel's choosing.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
        }),
        "vcpu-ioctl-tty" => filtered("vcpu0", ThreadKind::Vcpu, || {
            let mut ws: libc::winsize = libc::winsize {
                ws_row: 0,
                ws_col: 0,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCGWINSZ writes one winsize into `ws`.
            unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) };
        }),
        "device-clone" => filtered("vsock", ThreadKind::Device, || {
            let _ = std::thread::spawn(|| {}).join();
        }),
        other => panic!("unknown case {other}"),
    }
    println!("survived {case}");
    std::process::exit(0);
}

#[test]
fn forbidden_calls_end_the_process_with_159_and_a_diagnostic() {
    if let Some(case) = child_case() {
        run_denied_case(&case);
    }
    let test = "forbidden_calls_end_the_process_with_159_and_a_diagnostic";
    let denied = [
        (
            "vcpu-openat",
            "thread vcpu0 made a forbidden system call 257 (openat)",
        ),
        (
            "device-socket-inet",
            "thread vsock made a forbidden system call 41 (socket)",
        ),
        (
            "control-execve",
            "thread control made a forbidden system call 59 (execve)",
        ),
        (
            "vcpu-mmap-exec",
            "thread vcpu1 made a forbidden system call 9 (mmap)",
        ),
        (
            "vcpu-ioctl-tty",
            "thread vcpu0 made a forbidden system call 16 (ioctl)",
        ),
    ];
    for (case, line) in denied {
        let out = child(test, case);
        let err = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(EXIT_SECCOMP_DENIED),
            "{case}: {:?}, stderr: {err}",
            out.status
        );
        assert!(err.contains(&format!("seccomp: {line}")), "{case}: {err}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("survived"));
    }
    // Thread creation is denied too, but glibc blocks every signal around clone, and a trap
    // while SIGSYS is blocked becomes the kernel's SIGSYS kill: no line, status "killed by 31".
    let out = child(test, "device-clone");
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{:?}", out.status);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("survived"));
    // The same families of call pass where the rules allow them, and in log mode.
    for case in ["device-socket-unix", "log-vcpu-openat"] {
        let out = child(test, case);
        assert_eq!(out.status.code(), Some(0), "{case}: {}", stderr(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("survived {case}")));
    }
}

#[test]
fn allowed_calls_work_on_every_kind_and_threads_end_cleanly() {
    seccomp::prepare(Mode::Enforce, None).expect("prepare");
    assert!(seccomp::active());
    for kind in [
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Fs,
        ThreadKind::Control,
    ] {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two new descriptors into `fds`.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let got = filtered("worker", kind, move || {
            // The allocator (large blocks are mmapped and unmapped), a hash map's random seed,
            // a sleep, and I/O on descriptors the thread was given.
            let v: Vec<u64> = (0..1_000_000).collect();
            let mut m = std::collections::HashMap::new();
            m.insert(1, v.len());
            drop(v);
            std::thread::sleep(Duration::from_millis(1));
            let msg = m[&1].to_le_bytes();
            let mut back = [0u8; 8];
            // SAFETY: both descriptors are the pipe's, the buffers outlive the calls.
            unsafe {
                assert_eq!(libc::write(fds[1], msg.as_ptr().cast(), 8), 8);
                assert_eq!(libc::read(fds[0], back.as_mut_ptr().cast(), 8), 8);
                libc::close(fds[0]);
                libc::close(fds[1]);
            }
            usize::from_le_bytes(back)
        });
        assert_eq!(got, 1_000_000, "{kind:?}");
    }
}

/// A long-mode guest: prints "hi" on COM1, waits until the host writes a non-zero quadword at
/// [`GO`], then writes 42 to the power-off port.
const GUEST: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'h', // mov al, 'h'
    0xee, // out dx, al
    0xb0, b'i', // mov al, 'i'
    0xee, // out dx, al
    0x49, 0xc7, 0xc7, 0x00, 0x00, 0x30, 0x00, // mov r15, 0x300000
    0x49, 0x8b, 0x07, // 1: mov rax, [r15]
    0x48, 0x85, 0xc0, // test rax, rax
    0x74, 0xf8, // jz 1b
    0x66, 0xba, 0x01, 0x05, // mov dx, 0x501
    0xb8, 42, 0, 0, 0,    // mov eax, 42
    0xef, // out dx, eax
    0xf4, // hlt
];
const GO: u64 = 0x300000;

/// (thread name, seccomp mode) of every thread of this process, from /proc.
fn seccomp_modes() -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
        };
        if let (Some(name), Some(mode)) = (field("Name:"), field("Seccomp:")) {
            out.push((name, mode.parse().unwrap_or(0)));
        }
    }
    out
}

fn run_guest(dir: &Path) {
    seccomp::prepare(Mode::Enforce, None).expect("prepare");
    let image = dir.join("guest.bin");
    std::fs::write(&image, GUEST).unwrap();
    let mut cfg = MachineConfig::new(BootSource::Raw {
        path: image,
        load_addr: 0x100000,
        mode: RawMode::Long,
    });
    cfg.memory_mib = 16;
    cfg.vcpus = 2;
    cfg.console_log = Some(dir.join("console.log"));
    let sock = dir.join("v.sock");
    cfg.vsock_path = Some(sock.clone());
    let vmm = Vmm::start(&cfg).expect("start the VM");
    // Exercise the filtered vsock thread: accept, a CONNECT line for a guest without a driver.
    if let Ok(mut s) = UnixStream::connect(&sock) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(b"CONNECT 1234\n");
        let _ = s.read(&mut [0u8; 16]);
    }
    // Every vCPU thread and the vsock thread carry a filter (mode 2); this thread does not.
    let modes = seccomp_modes();
    for name in ["vcpu0", "vcpu1", "vsock"] {
        assert!(modes.contains(&(name.to_string(), 2)), "{name}: {modes:?}");
    }
    assert!(modes.iter().all(|(n, m)| *m == 2 || !n.starts_with("vcpu")));
    // The rest is what the worker's control thread does after the jail: pause, resume, wait,
    // stop and tear down (joining threads, unmapping RAM, removing the vsock socket file).
    filtered("control", ThreadKind::Control, move || {
        vmm.pause().expect("pause");
        vmm.resume().expect("resume");
        vmm.write_memory(GO, &1u64.to_le_bytes()).unwrap();
        let outcome = vmm.wait(Some(Duration::from_secs(60)));
        assert_eq!(outcome, Some(Outcome::PowerOff { code: 42 }));
        assert_eq!(vmm.console(), b"hi");
        vmm.stop();
        drop(vmm);
    });
    assert_eq!(std::fs::read(dir.join("console.log")).unwrap(), b"hi");
    println!("guest powered off");
    std::process::exit(0);
}

#[test]
fn a_raw_guest_runs_to_power_off_with_filtered_vcpu_and_device_threads() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm is not usable here");
        return;
    }
    if let Some(dir) = child_case() {
        run_guest(Path::new(&dir));
    }
    let dir = std::env::temp_dir().join(format!("seccomp-guest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = child(
        "a_raw_guest_runs_to_power_off_with_filtered_vcpu_and_device_threads",
        dir.to_str().unwrap(),
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("guest powered off"));
}

// ---- the file server's thread ---------------------------------------------------------------

/// A FUSE request as the guest's driver builds it.
fn fuse(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(40 + body.len());
    r.extend_from_slice(&((40 + body.len()) as u32).to_le_bytes());
    r.extend_from_slice(&opcode.to_le_bytes());
    r.extend_from_slice(&unique.to_le_bytes());
    r.extend_from_slice(&nodeid.to_le_bytes());
    r.extend_from_slice(&[0u8; 16]);
    r.extend_from_slice(body);
    r
}

fn with_name(fixed: &[u8], names: &[&str]) -> Vec<u8> {
    let mut b = fixed.to_vec();
    for n in names {
        b.extend_from_slice(n.as_bytes());
        b.push(0);
    }
    b
}

/// Every operation of the file server, on a thread under the file server's filter: each must
/// succeed (a call missing from the list would end the process instead).
fn run_fs_case(dir: &Path) {
    use supermachine_core::devices::virtio::fs::protocol::op;
    use supermachine_core::devices::virtio::fs::Server;
    seccomp::prepare(Mode::Enforce, None).expect("prepare");
    std::fs::write(dir.join("host.txt"), b"from the host").unwrap();
    let mut server = Server::open(dir, false).expect("open the share");
    // SAFETY: getuid and getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let done = filtered("virtio-fs", ThreadKind::Fs, move || {
        let mut unique = 0;
        let mut call = |opcode: u32, node: u64, body: &[u8]| -> Vec<u8> {
            unique += 1;
            let out = server
                .handle(&fuse(opcode, unique, node, body), 1 << 20)
                .expect("a reply");
            let err = i32::from_le_bytes(out[4..8].try_into().unwrap());
            assert_eq!(err, 0, "operation {opcode} failed with {}", -err);
            out[16..].to_vec()
        };
        let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        let init: Vec<u8> = [7u32, 31, 0, 0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        call(op::INIT, 0, &init);
        let host = u64_at(&call(op::LOOKUP, 1, &with_name(&[], &["host.txt"])), 0);
        let created = call(
            op::CREATE,
            1,
            &with_name(
                &[2, 0, 0, 0, 0o644u32 as u8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                &["new"],
            ),
        );
        let (node, fh) = (u64_at(&created, 0), u64_at(&created, 128));
        let mut write = [fh.to_le_bytes(), 0u64.to_le_bytes()].concat();
        write.extend_from_slice(&5u32.to_le_bytes());
        write.extend_from_slice(&[0u8; 20]);
        write.extend_from_slice(b"hello");
        call(op::WRITE, node, &write);
        let mut read = [fh.to_le_bytes(), 0u64.to_le_bytes()].concat();
        read.extend_from_slice(&100u32.to_le_bytes());
        read.extend_from_slice(&[0u8; 20]);
        assert_eq!(call(op::READ, node, &read), b"hello");
        call(op::FSYNC, node, &[fh.to_le_bytes(), [0; 8]].concat());
        // chmod, truncate, both times, chown to the same ids.
        let mut setattr = vec![0u8; 88];
        setattr[0..4].copy_from_slice(&(1u32 | 8 | 16 | 32 | 2 | 4).to_le_bytes());
        setattr[16..24].copy_from_slice(&3u64.to_le_bytes());
        setattr[68..72].copy_from_slice(&0o600u32.to_le_bytes());
        setattr[76..80].copy_from_slice(&uid.to_le_bytes());
        setattr[80..84].copy_from_slice(&gid.to_le_bytes());
        call(op::SETATTR, node, &setattr);
        call(op::GETATTR, host, &[0u8; 16]);
        call(
            op::RELEASE,
            node,
            &[fh.to_le_bytes(), [0; 8], [0; 8]].concat(),
        );
        let sub = u64_at(
            &call(
                op::MKDIR,
                1,
                &with_name(&[0xed, 1, 0, 0, 0, 0, 0, 0], &["d"]),
            ),
            0,
        );
        let link = u64_at(
            &call(op::SYMLINK, sub, &with_name(&[], &["ln", "../new"])),
            0,
        );
        assert_eq!(call(op::READLINK, link, &[]), b"../new");
        call(op::LINK, sub, &with_name(&node.to_le_bytes(), &["hard"]));
        call(
            op::RENAME,
            1,
            &with_name(&sub.to_le_bytes(), &["host.txt", "moved"]),
        );
        let dfh = u64_at(&call(op::OPENDIR, sub, &[0u8; 8]), 0);
        let mut readdir = [dfh.to_le_bytes(), 0u64.to_le_bytes()].concat();
        readdir.extend_from_slice(&4096u32.to_le_bytes());
        readdir.extend_from_slice(&[0u8; 20]);
        assert!(!call(op::READDIR, sub, &readdir).is_empty());
        call(op::FSYNCDIR, sub, &[dfh.to_le_bytes(), [0; 8]].concat());
        call(
            op::RELEASEDIR,
            sub,
            &[dfh.to_le_bytes(), [0; 8], [0; 8]].concat(),
        );
        call(op::STATFS, 1, &[]);
        call(op::ACCESS, 1, &[4, 0, 0, 0, 0, 0, 0, 0]);
        for name in ["ln", "hard", "moved"] {
            call(op::UNLINK, sub, &with_name(&[], &[name]));
        }
        call(op::RMDIR, 1, &with_name(&[], &["d"]));
        call(op::UNLINK, 1, &with_name(&[], &["new"]));
        call(op::DESTROY, 0, &[]);
        // The one open the server must never make: a path not beneath a directory it holds.
        true
    });
    assert!(done);
    println!("survived fs-server");
    if std::env::var("SECCOMP_FS_OPENAT").is_ok() {
        filtered("virtio-fs", ThreadKind::Fs, || {
            // SAFETY: a valid NUL-terminated path; the descriptor is closed if one comes back.
            let fd = unsafe { libc::openat(libc::AT_FDCWD, c"/etc/hostname".as_ptr(), 0) };
            if fd >= 0 {
                // SAFETY: fd was just opened here.
                unsafe { libc::close(fd) };
            }
        });
        println!("survived fs-openat");
    }
    std::process::exit(0);
}

#[test]
fn the_file_server_works_under_its_own_filter_and_nothing_more() {
    if let Some(dir) = child_case() {
        run_fs_case(Path::new(&dir));
    }
    let test = "the_file_server_works_under_its_own_filter_and_nothing_more";
    let dir = std::env::temp_dir().join(format!("seccomp-fs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = child(test, dir.to_str().unwrap());
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("survived fs-server"));
    // A plain openat on the same thread ends the process.
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &dir)
        .env("SECCOMP_FS_OPENAT", "1")
        .output()
        .expect("re-run the test binary");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        out.status.code(),
        Some(EXIT_SECCOMP_DENIED),
        "stderr: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out)
            .contains("seccomp: thread virtio-fs made a forbidden system call 257 (openat)"),
        "{}",
        stderr(&out)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("survived fs-openat"));
}
