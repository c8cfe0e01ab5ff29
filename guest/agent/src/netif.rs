//! The interface side of the `net` request: which interface, then its link (MAC, MTU), IPv4
//! address and default route, set with the classic socket ioctls (libc only, no netlink library).

use std::ffi::OsString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::net::{Config, Failure};
use crate::sys;

const SYS_CLASS_NET: &str = "/sys/class/net";
/// `/sys/class/net/*/type` of an Ethernet interface (ARPHRD_ETHER).
const ETHERNET: &str = "1";
/// Most entries of /sys/class/net looked at: a guest has a handful.
pub const MAX_INTERFACES: usize = 256;
/// Most IPv4 addresses removed from the interface, and default routes removed, before giving up.
const MAX_FLUSH: usize = 256;
/// Interface names shown in an error message.
const SHOWN_NAMES: usize = 8;

fn list_names(names: &[OsString]) -> String {
    let mut shown: Vec<String> = names
        .iter()
        .take(SHOWN_NAMES)
        .map(|n| n.to_string_lossy().escape_debug().to_string())
        .collect();
    if names.len() > SHOWN_NAMES {
        shown.push("…".into());
    }
    shown.join(", ")
}

fn is_ethernet(name: &OsString) -> bool {
    let mut path = std::path::PathBuf::from(SYS_CLASS_NET);
    path.push(name);
    path.push("type");
    // sysfs attributes are at most a page; the type is a short decimal number.
    std::fs::read_to_string(path).is_ok_and(|t| t.trim() == ETHERNET)
}

/// The name of the one Ethernet interface besides `lo`. Anything but exactly one is a request
/// error naming what was found.
pub fn find_ethernet() -> Result<String, Failure> {
    let dir = std::fs::read_dir(SYS_CLASS_NET)
        .map_err(|e| Failure::os(format!("list {SYS_CLASS_NET}"), e))?;
    let (mut all, mut ethernet) = (Vec::new(), Vec::new());
    for entry in dir {
        let entry = entry.map_err(|e| Failure::os(format!("list {SYS_CLASS_NET}"), e))?;
        if all.len() == MAX_INTERFACES {
            return Err(Failure::Request(format!(
                "net: more than {MAX_INTERFACES} network interfaces"
            )));
        }
        let name = entry.file_name();
        if name != "lo" && is_ethernet(&name) {
            ethernet.push(name.clone());
        }
        all.push(name);
    }
    match ethernet.as_slice() {
        [one] if one.len() < libc::IFNAMSIZ => Ok(one.to_string_lossy().into_owned()),
        [_] | [] => Err(Failure::Request(format!(
            "net: no usable Ethernet interface (interfaces: {})",
            list_names(&all)
        ))),
        many => Err(Failure::Request(format!(
            "net: expected one Ethernet interface, found {}: {}",
            many.len(),
            list_names(many)
        ))),
    }
}

/// A `struct sockaddr` holding an IPv4 address (the layout of `sockaddr_in`, port 0).
fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let mut sa = libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: [0; 14],
    };
    for (dst, src) in sa.sa_data[2..6].iter_mut().zip(addr.octets()) {
        *dst = src as libc::c_char;
    }
    sa
}

/// An AF_INET datagram socket for the interface ioctls, and the interface's name.
struct Interface {
    sock: OwnedFd,
    /// NUL-terminated, as `ifreq` and `rtentry` want it.
    name: [libc::c_char; libc::IFNAMSIZ],
}

impl Interface {
    fn open(name: &str) -> io::Result<Interface> {
        let mut c_name = [0 as libc::c_char; libc::IFNAMSIZ];
        // find_ethernet keeps names shorter than IFNAMSIZ, so the last byte stays NUL.
        for (dst, src) in c_name.iter_mut().zip(name.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        // SAFETY: socket takes only integers; its result is checked before it is wrapped, so the
        // descriptor is new and owned by nothing else.
        let sock = unsafe {
            let fd = sys::cvt(libc::socket(
                libc::AF_INET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                0,
            ))?;
            OwnedFd::from_raw_fd(fd)
        };
        Ok(Interface { sock, name: c_name })
    }

    fn request(&self) -> libc::ifreq {
        // SAFETY: `ifreq` is a plain C struct (a name array and a union of integers, sockaddrs and
        // a raw pointer), for which all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        req.ifr_name = self.name;
        req
    }

    /// One interface ioctl; the kernel reads `req` and, for the "get" requests, writes it.
    fn ioctl(&self, op: libc::Ioctl, req: &mut libc::ifreq) -> io::Result<()> {
        // SAFETY: every op used here takes a `struct ifreq`, which `req` is, exclusively borrowed
        // for the call; its name is NUL-terminated (IFNAMSIZ bytes, the last one 0).
        sys::cvt(unsafe { libc::ioctl(self.sock.as_raw_fd(), op, req as *mut libc::ifreq) })
            .map(|_| ())
    }

    fn set_up(&self, up: bool) -> io::Result<()> {
        let mut req = self.request();
        self.ioctl(libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled in `ifru_flags`, a plain integer.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        let up_flag = libc::IFF_UP as libc::c_short;
        req.ifr_ifru.ifru_flags = if up {
            flags | up_flag
        } else {
            flags & !up_flag
        };
        self.ioctl(libc::SIOCSIFFLAGS, &mut req)
    }

    fn set_mac(&self, mac: &[u8; 6]) -> io::Result<()> {
        let mut hw = libc::sockaddr {
            sa_family: libc::ARPHRD_ETHER,
            sa_data: [0; 14],
        };
        for (dst, src) in hw.sa_data.iter_mut().zip(mac) {
            *dst = *src as libc::c_char;
        }
        let mut req = self.request();
        req.ifr_ifru.ifru_hwaddr = hw;
        self.ioctl(libc::SIOCSIFHWADDR, &mut req)
    }

    fn set_mtu(&self, mtu: u32) -> io::Result<()> {
        let mut req = self.request();
        req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
        self.ioctl(libc::SIOCSIFMTU, &mut req)
    }

    fn set_address(&self, op: libc::Ioctl, addr: Ipv4Addr) -> io::Result<()> {
        let mut req = self.request();
        req.ifr_ifru.ifru_addr = sockaddr(addr);
        self.ioctl(op, &mut req)
    }

    /// Removes the interface's IPv4 addresses: setting 0.0.0.0 deletes the first one labelled
    /// with its name (and with it the secondaries of its subnet), until none is left.
    fn flush_ipv4(&self) -> io::Result<()> {
        for _ in 0..MAX_FLUSH {
            let mut req = self.request();
            match self.ioctl(libc::SIOCGIFADDR, &mut req) {
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => return Ok(()),
                Err(e) => return Err(e),
                Ok(()) => self.set_address(libc::SIOCSIFADDR, Ipv4Addr::UNSPECIFIED)?,
            }
        }
        Err(io::Error::from_raw_os_error(libc::EMLINK))
    }

    fn route(&self, op: libc::Ioctl, gateway: Option<Ipv4Addr>) -> io::Result<()> {
        // SAFETY: `rtentry` is a plain C struct of integers, sockaddrs and raw pointers, for which
        // all zeroes is valid (null pointers: no device name, no window or IRTT settings).
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_flags = libc::RTF_UP;
        let mut name = self.name;
        if let Some(gw) = gateway {
            rt.rt_gateway = sockaddr(gw);
            rt.rt_flags |= libc::RTF_GATEWAY;
            rt.rt_dev = name.as_mut_ptr();
        }
        // SAFETY: SIOCADDRT and SIOCDELRT read one `struct rtentry` from `rt`, a live local; its
        // `rt_dev`, when set, points at `name`, a NUL-terminated array that outlives the call.
        let ret = unsafe { libc::ioctl(self.sock.as_raw_fd(), op, &mut rt as *mut libc::rtentry) };
        sys::cvt(ret).map(|_| ())
    }

    /// Deletes every default route of the main table (ESRCH: none left), then adds one via
    /// `gateway` on this interface.
    fn replace_default_route(&self, gateway: Ipv4Addr) -> io::Result<()> {
        let mut flushed = false;
        for _ in 0..MAX_FLUSH {
            match self.route(libc::SIOCDELRT, None) {
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                    flushed = true;
                    break;
                }
                Err(e) => return Err(e),
                Ok(()) => {}
            }
        }
        if !flushed {
            return Err(io::Error::from_raw_os_error(libc::EMLINK));
        }
        self.route(libc::SIOCADDRT, Some(gateway))
    }
}

/// Configures `name` as `config` asks, in the order the kernel needs: the link is changed while
/// down (some drivers take a new MAC only then), the route once the address is up.
pub fn configure(name: &str, config: &Config) -> Result<(), Failure> {
    let step = |what: &str| format!("{what} of {name}");
    let dev = Interface::open(name).map_err(|e| Failure::os("open a control socket", e))?;
    dev.set_up(false)
        .map_err(|e| Failure::os(format!("bring {name} down"), e))?;
    dev.set_mac(&config.mac)
        .map_err(|e| Failure::os(step("set the MAC address"), e))?;
    dev.set_mtu(config.mtu)
        .map_err(|e| Failure::os(step("set the MTU"), e))?;
    dev.flush_ipv4()
        .map_err(|e| Failure::os(step("remove the old addresses"), e))?;
    dev.set_address(libc::SIOCSIFADDR, config.address)
        .map_err(|e| Failure::os(step("set the address"), e))?;
    dev.set_address(libc::SIOCSIFNETMASK, config.netmask())
        .map_err(|e| Failure::os(step("set the netmask"), e))?;
    dev.set_address(libc::SIOCSIFBRDADDR, config.broadcast())
        .map_err(|e| Failure::os(step("set the broadcast address"), e))?;
    dev.set_up(true)
        .map_err(|e| Failure::os(format!("bring {name} up"), e))?;
    dev.replace_default_route(config.gateway)
        .map_err(|e| Failure::os(format!("set the default route via {}", config.gateway), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn sockaddr_is_a_sockaddr_in() {
        let sa = sockaddr(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        let data: Vec<u8> = sa.sa_data.iter().map(|&b| b as u8).collect();
        assert_eq!(data, [0, 0, 10, 0, 2, 15, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn names_are_listed_briefly() {
        let names: Vec<OsString> = (0..10).map(|i| OsString::from(format!("eth{i}"))).collect();
        assert_eq!(list_names(&names[..2]), "eth0, eth1");
        assert!(list_names(&names).ends_with("eth7, …"));
        let odd = OsString::from(std::ffi::OsStr::from_bytes(b"a\nb"));
        assert_eq!(list_names(&[odd]), "a\\nb");
    }
}
