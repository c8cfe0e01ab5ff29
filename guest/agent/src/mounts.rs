//! The `mount` request: a disk the host attached (a named volume), or a host folder the host
//! shares (virtio-fs, named by its tag), mounted at a directory of the guest's root file system,
//! made with its parents when missing.
//!
//! Only virtio block devices (`/dev/vd[a-z]+`) with the disk file system types in [`FSTYPES`],
//! and virtio-fs tags with `virtiofs`, are accepted; every mount is `nosuid,nodev`, so a volume
//! another guest wrote, or a host folder, cannot carry set-id programs or device nodes into
//! this one.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;

use crate::conn::{Conn, End};
use crate::files::{check_path, os_error};
use crate::proto::{self, kind, Frame, BYTES, UINT};
use crate::sys;

pub const SOURCE: u8 = 1;
pub const TARGET: u8 = 2;
pub const FSTYPE: u8 = 3;
pub const READ_ONLY: u8 = 4;
/// `unmount` field: the directory to unmount.
pub const UNMOUNT_SCHEMA: &[(u8, u8)] = &[(TARGET, BYTES)];
pub const SCHEMA: &[(u8, u8)] = &[
    (SOURCE, BYTES),
    (TARGET, BYTES),
    (FSTYPE, BYTES),
    (READ_ONLY, UINT),
];
/// File system types a `mount` request may name for a disk.
pub const FSTYPES: &[&[u8]] = &[b"ext4"];
/// The file system type of a shared host folder; its source is the folder's tag.
pub const VIRTIOFS: &[u8] = b"virtiofs";
/// Longest virtio-fs tag (the device's configuration space holds 36 bytes).
pub const TAG_MAX: usize = 36;

/// Whether `source` is a virtio-fs tag as the host makes them: 1 to [`TAG_MAX`] ASCII
/// letters, digits, `.`, `_` and `-`.
pub fn is_virtiofs_tag(source: &[u8]) -> bool {
    (1..=TAG_MAX).contains(&source.len())
        && source
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `source` names a virtio block device: `/dev/vd` and lowercase letters.
pub fn is_virtio_disk(source: &[u8]) -> bool {
    source.strip_prefix(b"/dev/vd").is_some_and(|rest| {
        !rest.is_empty() && rest.len() <= 3 && rest.iter().all(u8::is_ascii_lowercase)
    })
}

/// The request's checks; `Err` is a one-line request error.
pub fn check(source: &[u8], target: &[u8], fstype: &[u8]) -> Result<(), String> {
    if fstype == VIRTIOFS {
        if !is_virtiofs_tag(source) {
            return Err(format!(
                "mount: {:?} is not a shared folder tag",
                String::from_utf8_lossy(source)
            ));
        }
    } else if !is_virtio_disk(source) {
        return Err(format!(
            "mount: {:?} is not a virtio disk (/dev/vdX)",
            String::from_utf8_lossy(source)
        ));
    }
    check_path(target)?;
    if target == b"/" || target.split(|&b| b == b'/').any(|part| part == b"..") {
        return Err("mount: the target must be a directory below / without '..'".into());
    }
    if fstype != VIRTIOFS && !FSTYPES.contains(&fstype) {
        return Err(format!(
            "mount: file system type {:?} is not supported",
            String::from_utf8_lossy(fstype)
        ));
    }
    Ok(())
}

pub fn run(conn: &mut Conn, frame: &Frame) -> Result<(), End> {
    let fields = Conn::decode(frame, SCHEMA)?;
    let source = fields.bytes(SOURCE).unwrap_or(b"").to_vec();
    let target = fields.bytes(TARGET).unwrap_or(b"").to_vec();
    let fstype = fields.bytes(FSTYPE).unwrap_or(b"ext4").to_vec();
    let read_only = fields.uint(READ_ONLY).unwrap_or(0) != 0;
    drop(fields);
    if let Err(message) = check(&source, &target, &fstype) {
        return conn.reply_error("request", None, &message);
    }
    if let Err(e) = std::fs::create_dir_all(OsStr::from_bytes(&target)) {
        return os_error(conn, "mount: mkdir", &target, &e);
    }
    let cstr = |b: &[u8]| CString::new(b).expect("checked: no NUL");
    let (csource, ctarget, cfstype) = (cstr(&source), cstr(&target), cstr(&fstype));
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    // SAFETY: the three strings are NUL-terminated CStrings that outlive the call; data is null,
    // which mount accepts.
    let ret = unsafe {
        libc::mount(
            csource.as_ptr(),
            ctarget.as_ptr(),
            cfstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if let Err(e) = sys::cvt(ret) {
        return os_error(conn, "mount", &target, &e);
    }
    proto::send(conn.fd(), kind::OK, &[])?;
    Ok(())
}

/// The `unmount` request: unmounts what `mount` mounted at `target`, so its journal is clean
/// before the host stops the VM. A busy mount is an `os` error (EBUSY); the data written so far
/// is on the disk all the same (synced first).
pub fn unmount(conn: &mut Conn, frame: &Frame) -> Result<(), End> {
    let fields = Conn::decode(frame, UNMOUNT_SCHEMA)?;
    let target = fields.bytes(TARGET).unwrap_or(b"").to_vec();
    drop(fields);
    if let Err(message) = check_path(&target) {
        return conn.reply_error("request", None, &message);
    }
    let ctarget = CString::new(target.clone()).expect("checked: no NUL");
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: `ctarget` is a NUL-terminated CString that outlives the call.
    if let Err(e) = sys::cvt(unsafe { libc::umount2(ctarget.as_ptr(), 0) }) {
        return os_error(conn, "unmount", &target, &e);
    }
    proto::send(conn.fd(), kind::OK, &[])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_virtio_disks_ext4_and_real_targets_are_accepted() {
        assert!(check(b"/dev/vdb", b"/data", b"ext4").is_ok());
        assert!(check(b"/dev/vdaa", b"/srv/x y", b"ext4").is_ok());
        assert!(check(b"work", b"/mnt/work", b"virtiofs").is_ok());
        assert!(check(b"sm-0.share_1", b"/data", b"virtiofs").is_ok());
        assert!(check(&[b'x'; 37], b"/data", b"virtiofs").is_err());
        for (source, target, fstype) in [
            (&b"/dev/sda"[..], &b"/data"[..], &b"ext4"[..]),
            (b"/dev/vd", b"/data", b"ext4"),
            (b"/dev/vdB", b"/data", b"ext4"),
            (b"/dev/vdb/../sda", b"/data", b"ext4"),
            (b"/dev/vdb", b"/", b"ext4"),
            (b"/dev/vdb", b"data", b"ext4"),
            (b"/dev/vdb", b"/a/../etc", b"ext4"),
            (b"/dev/vdb", b"/data", b"proc"),
            (b"/dev/vdb", b"/data", b"virtiofs"),
            (b"work", b"/data", b"ext4"),
            (b"", b"/data", b"virtiofs"),
            (b"a/b", b"/data", b"virtiofs"),
            (b"../x", b"/data", b"virtiofs"),
            (b"work", b"/", b"virtiofs"),
            (b"work", b"/a/../etc", b"virtiofs"),
        ] {
            assert!(
                check(source, target, fstype).is_err(),
                "{source:?} {target:?} {fstype:?}"
            );
        }
    }
}
