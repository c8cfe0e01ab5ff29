//! The file side of the `net` request: `/etc/resolv.conf` and `/etc/hosts`, each replaced
//! atomically (a temporary file in `/etc`, then a rename over the old name). A symbolic link at
//! `/etc` or at either file is replaced, never followed: the image decides where links point, and
//! the agent writes only the files it means to.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::net::{Config, Failure};
use crate::sys;

const ETC: &str = "/etc";
const FILE_MODE: libc::mode_t = 0o644;
const DIR_MODE: u32 = 0o755;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

pub fn resolv_conf(config: &Config) -> String {
    let mut out: String = config
        .dns
        .iter()
        .map(|server| format!("nameserver {server}\n"))
        .collect();
    out.push_str("options timeout:2 attempts:2\n");
    out
}

pub fn hosts(config: &Config) -> String {
    let mut out = String::from("127.0.0.1\tlocalhost\n");
    if let Some(name) = &config.hostname {
        out.push_str(&format!("{}\t{name}\n", config.address));
    }
    for entry in &config.hosts {
        out.push_str(&format!("{}\t{}\n", entry.address, entry.names.join(" ")));
    }
    out
}

/// `dir` as a real directory: a symbolic link there is removed and a missing one created (0755).
fn ensure_dir(dir: &str) -> io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => std::fs::remove_file(dir)?,
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::DirBuilder::new().mode(DIR_MODE).create(dir)?;
    // Exactly 0755, whatever the umask.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
}

/// `dir`, made a real directory and opened without following a symbolic link (one that appeared
/// meanwhile fails with ELOOP).
fn open_dir(dir: &str) -> io::Result<OwnedFd> {
    ensure_dir(dir)?;
    let path = CString::new(dir).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    sys::open(
        &path,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
}

fn c_name(name: &str) -> CString {
    CString::new(name).expect("file names without NUL")
}

/// Writes `content` to a new file in `dir` and renames it over `name` (a link there is replaced
/// by the rename itself, which never follows the last component).
fn replace(dir: &OwnedFd, name: &str, content: &[u8]) -> io::Result<()> {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let temp = c_name(&format!(".{name}.sm-tmp.{}.{n}", std::process::id()));
    let target = c_name(name);
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `temp` is a NUL-terminated CString that outlives the call; the mode is passed as the
    // `unsigned int` the variadic openat expects. The result is checked before it is wrapped, so
    // the descriptor is new and owned by nothing else.
    let file = unsafe {
        let fd = sys::cvt(libc::openat(
            dir.as_raw_fd(),
            temp.as_ptr(),
            flags,
            FILE_MODE as libc::c_uint,
        ))?;
        OwnedFd::from_raw_fd(fd)
    };
    let written = sys::write_all(file.as_raw_fd(), content).and_then(|()| {
        // SAFETY: fchmod takes only integers; `file` stays open for the call. Explicit, so the
        // umask does not apply.
        sys::cvt(unsafe { libc::fchmod(file.as_raw_fd(), FILE_MODE) }).map(|_| ())
    });
    if written.is_ok() {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat writes one `stat` into the live `st`; `file` stays open for the call.
        if unsafe { libc::fstat(file.as_raw_fd(), st.as_mut_ptr()) } == 0 {
            // SAFETY: fstat succeeded, so it initialised `st`.
            crate::changes::agent_wrote(unsafe { st.assume_init() }.st_ino);
        }
    }
    drop(file);
    let renamed = written.and_then(|()| {
        // SAFETY: both names are NUL-terminated CStrings that outlive the call, relative to `dir`,
        // an open directory descriptor.
        let ret = unsafe {
            libc::renameat(
                dir.as_raw_fd(),
                temp.as_ptr(),
                dir.as_raw_fd(),
                target.as_ptr(),
            )
        };
        sys::cvt(ret).map(|_| ())
    });
    if renamed.is_err() {
        // SAFETY: `temp` is a NUL-terminated CString relative to the open directory `dir`.
        unsafe { libc::unlinkat(dir.as_raw_fd(), temp.as_ptr(), 0) };
    }
    renamed
}

/// Replaces `/etc/resolv.conf` and `/etc/hosts` with what `config` asks for.
pub fn write(config: &Config) -> Result<(), Failure> {
    let dir = open_dir(ETC).map_err(|e| Failure::os(format!("open {ETC}"), e))?;
    for (name, content) in [
        ("resolv.conf", resolv_conf(config)),
        ("hosts", hosts(config)),
    ] {
        replace(&dir, name, content.as_bytes())
            .map_err(|e| Failure::os(format!("write {ETC}/{name}"), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::HostsEntry;
    use std::net::Ipv4Addr;

    fn config(hostname: Option<&str>) -> Config {
        Config {
            mac: [2, 0, 0, 0, 0, 1],
            address: Ipv4Addr::new(10, 0, 2, 15),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            dns: vec![Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(10, 0, 2, 4)],
            hosts: vec![HostsEntry {
                address: Ipv4Addr::new(10, 0, 2, 2),
                names: vec!["host".into(), "gw.internal".into()],
            }],
            hostname: hostname.map(str::to_string),
            mtu: 1500,
            reset_connections: false,
        }
    }

    #[test]
    fn resolv_conf_lists_the_servers() {
        assert_eq!(
            resolv_conf(&config(None)),
            "nameserver 10.0.2.3\nnameserver 10.0.2.4\noptions timeout:2 attempts:2\n"
        );
    }

    #[test]
    fn hosts_has_localhost_then_the_hostname_then_the_entries() {
        assert_eq!(
            hosts(&config(Some("box"))),
            "127.0.0.1\tlocalhost\n10.0.2.15\tbox\n10.0.2.2\thost gw.internal\n"
        );
        assert_eq!(
            hosts(&config(None)),
            "127.0.0.1\tlocalhost\n10.0.2.2\thost gw.internal\n"
        );
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sm-netetc-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    #[test]
    fn a_linked_or_missing_directory_becomes_a_real_one() {
        let dir = scratch("dir");
        let (target, link) = (dir.join("target"), dir.join("etc"));
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("passwd"), "kept").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let link_str = link.to_str().unwrap();
        drop(open_dir(link_str).unwrap());
        let meta = std::fs::symlink_metadata(&link).unwrap();
        assert!(meta.is_dir() && !meta.file_type().is_symlink());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        assert_eq!(std::fs::read_dir(&link).unwrap().count(), 0);
        assert_eq!(
            std::fs::read_to_string(target.join("passwd")).unwrap(),
            "kept"
        );

        std::fs::remove_dir(&link).unwrap();
        drop(open_dir(link_str).unwrap());
        assert!(std::fs::symlink_metadata(&link).unwrap().is_dir());
        // A directory that exists is left as it is.
        std::fs::write(link.join("x"), "").unwrap();
        drop(open_dir(link_str).unwrap());
        assert!(link.join("x").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn replace_writes_through_no_link() {
        let dir = scratch("replace");
        let elsewhere = dir.join("elsewhere");
        std::fs::write(&elsewhere, "untouched").unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.join("resolv.conf")).unwrap();
        let fd = open_dir(dir.to_str().unwrap()).unwrap();
        replace(&fd, "resolv.conf", b"nameserver 10.0.2.3\n").unwrap();
        let meta = std::fs::symlink_metadata(dir.join("resolv.conf")).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o644);
        assert_eq!(
            std::fs::read_to_string(dir.join("resolv.conf")).unwrap(),
            "nameserver 10.0.2.3\n"
        );
        assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "untouched");
        // Nothing left behind but the two files.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
