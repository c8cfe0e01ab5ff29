//! The `sync` request: after a restore from a memory snapshot the guest's wall clock lags by the time
//! the snapshot was stored, and every clone of the snapshot holds the same random state. The host
//! sends its time and fresh entropy.

use std::io;
use std::os::fd::AsRawFd;

use crate::conn::{Conn, End};
use crate::proto::{self, kind, Encoder, Frame, BYTES, UINT};
use crate::{sys, Context};

pub const TIME_NS: u8 = 1;
pub const ENTROPY: u8 = 2;
pub const OK_CLOCK_SET: u8 = 1;
pub const OK_ENTROPY_ADDED: u8 = 2;
pub const OK_TIME_NS: u8 = 3;

pub const SCHEMA: &[(u8, u8)] = &[(TIME_NS, UINT), (ENTROPY, BYTES)];

/// Most entropy one request may carry; the kernel's pool holds far less, so more would only make
/// the request bigger.
pub const MAX_ENTROPY: usize = 512;

// From <linux/random.h>; the libc crate does not define them.
/// `_IOW('R', 0x03, int[2])`
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
/// `_IO('R', 0x07)`
const RNDRESEEDCRNG: libc::Ioctl = 0x5207;

const NS_PER_S: u64 = 1_000_000_000;

/// `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }` as u32 words, so the
/// kernel reads it aligned. Every byte is credited as 8 bits.
fn pool_info(data: &[u8]) -> Vec<u32> {
    let mut words = Vec::with_capacity(2 + data.len().div_ceil(4));
    words.push((data.len() * 8) as u32);
    words.push(data.len() as u32);
    for chunk in data.chunks(4) {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        words.push(u32::from_ne_bytes(word));
    }
    words
}

fn add_entropy(data: &[u8]) -> io::Result<()> {
    let urandom = std::ffi::CString::new("/dev/urandom").expect("literal");
    let file = sys::open(&urandom, libc::O_WRONLY, 0)?;
    let info = pool_info(data);
    // SAFETY: RNDADDENTROPY reads a `struct rand_pool_info`: two ints, then `buf_size` bytes.
    // `pool_info` sets `buf_size` to `data.len()` and allocates 2 + ceil(len / 4) u32 words, so the
    // kernel reads only inside `info`, which outlives the call. Nothing is written back.
    sys::cvt(unsafe { libc::ioctl(file.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) })?;
    // Crediting alone leaves the CRNG on its old key until its next scheduled reseed; clones of a
    // snapshot would hand out the same random bytes until then.
    // SAFETY: RNDRESEEDCRNG takes no argument, so the kernel touches no memory of ours.
    match sys::cvt(unsafe { libc::ioctl(file.as_raw_fd(), RNDRESEEDCRNG) }) {
        // ENOTTY/EINVAL: a kernel before 4.17 without the ioctl. ENODATA: the CRNG is not seeded
        // yet; it seeds itself from the pool, entropy included, once it is.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOTTY | libc::EINVAL | libc::ENODATA)
            ) =>
        {
            Ok(())
        }
        other => other.map(|_| ()),
    }
}

fn timespec(ns: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (ns / NS_PER_S) as libc::time_t,
        tv_nsec: (ns % NS_PER_S) as libc::c_long,
    }
}

fn set_clock(ns: u64) -> io::Result<()> {
    let ts = timespec(ns);
    // SAFETY: clock_settime only reads the timespec `ts`, a live local.
    sys::cvt(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(|_| ())
}

fn now_ns() -> u64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
        Err(_) => 0,
    }
}

pub fn run(conn: &Conn, frame: &Frame, ctx: &Context) -> Result<(), End> {
    let fields = Conn::decode(frame, SCHEMA)?;
    let time_ns = fields.uint(TIME_NS);
    let entropy = fields.bytes(ENTROPY).unwrap_or(b"");
    if entropy.len() > MAX_ENTROPY {
        return conn.reply_error(
            "request",
            None,
            &format!(
                "sync: entropy of {} bytes exceeds the limit of {MAX_ENTROPY} bytes",
                entropy.len()
            ),
        );
    }
    let mut clock_set = false;
    let mut added = 0;
    // Outside a VM the clock and the random pool are the host's: never touch them.
    if ctx.pid1 {
        // Entropy first: a clock value the kernel refuses must not cost the guest its reseed.
        if !entropy.is_empty() {
            if let Err(e) = add_entropy(entropy) {
                let message = format!("sync: add entropy: {}", sys::errno_text(&e));
                return conn.reply_error("os", e.raw_os_error(), &message);
            }
            added = entropy.len();
        }
        if let Some(ns) = time_ns {
            if let Err(e) = set_clock(ns) {
                let message = format!("sync: set the clock: {}", sys::errno_text(&e));
                return conn.reply_error("os", e.raw_os_error(), &message);
            }
            clock_set = true;
        }
    }
    let payload = Encoder::new()
        .uint(OK_CLOCK_SET, clock_set as u64)
        .uint(OK_ENTROPY_ADDED, added as u64)
        .uint(OK_TIME_NS, now_ns())
        .finish();
    proto::send(conn.fd(), kind::OK, &payload)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_info_layout() {
        assert_eq!(pool_info(&[]), vec![0, 0]);
        assert_eq!(
            pool_info(&[1, 2, 3, 4, 5]),
            vec![
                40,
                5,
                u32::from_ne_bytes([1, 2, 3, 4]),
                u32::from_ne_bytes([5, 0, 0, 0])
            ]
        );
        let full = pool_info(&[0xab; MAX_ENTROPY]);
        assert_eq!(full.len(), 2 + MAX_ENTROPY / 4);
        assert_eq!(
            (full[0], full[1]),
            (8 * MAX_ENTROPY as u32, MAX_ENTROPY as u32)
        );
    }

    #[test]
    fn timespec_split() {
        let ts = timespec(1_924_992_000 * NS_PER_S + 123);
        assert_eq!((ts.tv_sec, ts.tv_nsec), (1_924_992_000, 123));
        let ts = timespec(u64::MAX);
        assert_eq!((ts.tv_sec, ts.tv_nsec), (18_446_744_073, 709_551_615));
    }
}
