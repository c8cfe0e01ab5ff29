//! The `net` request: the host chooses the guest's network identity (MAC, address, gateway,
//! resolver, host names) and the agent applies it to the one Ethernet interface (PROTOCOL.md).
//! Clones restored from one snapshot get their own identity this way, and with
//! `reset_connections` lose the TCP connections they inherited.
//!
//! Every value is checked before anything changes; the steps themselves are in `netif` (link,
//! address, route), `netetc` (/etc/resolv.conf, /etc/hosts) and `sockdiag` (connection reset).

use std::io;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use crate::conn::{Conn, End};
use crate::proto::{self, kind, Encoder, Fields, Frame, BYTES, LIST, UINT};
use crate::{netetc, netif, sockdiag, sys, Context};

pub const MAC: u8 = 1;
pub const ADDRESS: u8 = 2;
pub const PREFIX: u8 = 3;
pub const GATEWAY: u8 = 4;
pub const DNS: u8 = 5;
pub const HOSTS: u8 = 6;
pub const HOSTNAME: u8 = 7;
pub const MTU: u8 = 8;
pub const RESET_CONNECTIONS: u8 = 9;
pub const OK_INTERFACE: u8 = 1;
pub const OK_RESET: u8 = 2;

pub const SCHEMA: &[(u8, u8)] = &[
    (MAC, BYTES),
    (ADDRESS, BYTES),
    (PREFIX, UINT),
    (GATEWAY, BYTES),
    (DNS, LIST),
    (HOSTS, LIST),
    (HOSTNAME, BYTES),
    (MTU, UINT),
    (RESET_CONNECTIONS, UINT),
];

/// glibc's resolver reads at most three `nameserver` lines.
pub const MAX_DNS: usize = 3;
pub const MAX_HOSTS: usize = 64;
/// Longest `hosts` entry, in bytes.
pub const MAX_HOSTS_ENTRY: usize = 255;
pub const DEFAULT_MTU: u64 = 1500;
/// Below 68 bytes the kernel turns IPv4 off on the interface (RFC 791's minimum).
pub const MIN_MTU: u64 = 68;
pub const MAX_MTU: u64 = 65535;
/// A /31 or /32 leaves no room for a gateway besides the address.
pub const MAX_PREFIX: u64 = 30;
/// The kernel's limit for `sethostname` (HOST_NAME_MAX).
const MAX_HOSTNAME: usize = 64;
/// RFC 1035: a name is at most 253 characters, a label at most 63.
const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;
/// How much of a refused value an error message repeats.
const SHOWN: usize = 64;

/// One request at a time: two connections configuring the interface at once would interleave.
static NET_LOCK: Mutex<()> = Mutex::new(());

/// One `/etc/hosts` line: an address and its names.
pub struct HostsEntry {
    pub address: Ipv4Addr,
    pub names: Vec<String>,
}

/// A checked `net` request.
pub struct Config {
    pub mac: [u8; 6],
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    pub hosts: Vec<HostsEntry>,
    pub hostname: Option<String>,
    pub mtu: u32,
    pub reset_connections: bool,
}

impl Config {
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix))
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) | !mask(self.prefix))
    }
}

/// Why a `net` request failed: a refusal (kind `request`) or a failed system call (kind `os`).
pub enum Failure {
    Request(String),
    Os { step: String, err: io::Error },
}

impl Failure {
    pub fn os(step: impl Into<String>, err: io::Error) -> Failure {
        Failure::Os {
            step: step.into(),
            err,
        }
    }
}

/// A refused value for a message: lossy text, escaped (one line), shortened.
pub fn shown(value: &[u8]) -> String {
    let cut = &value[..value.len().min(SHOWN)];
    let text = format!("{:?}", String::from_utf8_lossy(cut));
    if cut.len() < value.len() {
        format!("{text}…")
    } else {
        text
    }
}

/// The netmask of `prefix` (0 to 32) as a number.
fn mask(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

fn format_mac(mac: &[u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

/// Whether `name` is a DNS host name (RFC 1123): dot-separated labels of letters, digits and
/// hyphens, none empty or longer than 63 bytes, none starting or ending with a hyphen.
pub fn is_host_name(name: &[u8]) -> bool {
    let label_ok = |label: &[u8]| {
        !label.is_empty()
            && label.len() <= MAX_LABEL
            && label
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-')
            && label.first() != Some(&b'-')
            && label.last() != Some(&b'-')
    };
    !name.is_empty() && name.len() <= MAX_NAME && name.split(|&b| b == b'.').all(label_ok)
}

fn required_bytes<'a>(fields: &Fields<'a>, tag: u8, name: &str) -> Result<&'a [u8], String> {
    fields
        .bytes(tag)
        .ok_or_else(|| format!("net: {name} is required"))
}

fn parse_mac(fields: &Fields<'_>) -> Result<[u8; 6], String> {
    let raw = required_bytes(fields, MAC, "mac")?;
    let mac: [u8; 6] = raw
        .try_into()
        .map_err(|_| format!("net: mac must be 6 bytes, got {}", raw.len()))?;
    if mac[0] & 1 != 0 {
        return Err(format!(
            "net: mac {} is a multicast address; the interface needs a unicast one",
            format_mac(&mac)
        ));
    }
    if mac == [0; 6] {
        return Err("net: mac 00:00:00:00:00:00 is not an interface address".into());
    }
    Ok(mac)
}

fn ipv4(raw: &[u8], name: &str) -> Result<Ipv4Addr, String> {
    let octets: [u8; 4] = raw
        .try_into()
        .map_err(|_| format!("net: {name} must be 4 bytes (IPv4), got {}", raw.len()))?;
    Ok(Ipv4Addr::from(octets))
}

/// Refuses addresses no host may have: "this network" (0/8), multicast, reserved and broadcast
/// (224/3), and, unless `loopback_ok`, loopback (127/8).
fn check_unicast(addr: Ipv4Addr, name: &str, loopback_ok: bool) -> Result<(), String> {
    let first = addr.octets()[0];
    if first == 0 || first >= 224 || (!loopback_ok && first == 127) {
        return Err(format!("net: {name} {addr} is not a unicast host address"));
    }
    Ok(())
}

fn parse_prefix(fields: &Fields<'_>) -> Result<u8, String> {
    match fields.uint(PREFIX) {
        None => Err("net: prefix is required".into()),
        Some(p @ 1..=MAX_PREFIX) => Ok(p as u8),
        Some(p) => Err(format!("net: prefix {p} is not between 1 and {MAX_PREFIX}")),
    }
}

/// `addr` must be a host of `network/prefix`: inside it, and neither its network nor its
/// broadcast address.
fn check_in_subnet(
    addr: Ipv4Addr,
    name: &str,
    network: Ipv4Addr,
    prefix: u8,
) -> Result<(), String> {
    let (bits, m) = (u32::from(addr), mask(prefix));
    if bits & m != u32::from(network) {
        return Err(format!("net: {name} {addr} is outside {network}/{prefix}"));
    }
    if bits & !m == 0 || bits & !m == !m {
        return Err(format!(
            "net: {name} {addr} is the network or broadcast address of {network}/{prefix}"
        ));
    }
    Ok(())
}

fn parse_dns(fields: &Fields<'_>) -> Result<Vec<Ipv4Addr>, String> {
    let list = fields.list(DNS).unwrap_or(&[]);
    if list.len() > MAX_DNS {
        return Err(format!(
            "net: dns has {} servers; at most {MAX_DNS} are allowed",
            list.len()
        ));
    }
    list.iter()
        .map(|raw| {
            let addr = ipv4(raw, "dns server")?;
            check_unicast(addr, "dns server", true)?;
            Ok(addr)
        })
        .collect()
}

/// One `hosts` entry, `IP NAME [NAME...]` separated by spaces or tabs.
fn parse_hosts_entry(index: usize, raw: &[u8]) -> Result<HostsEntry, String> {
    if raw.len() > MAX_HOSTS_ENTRY {
        return Err(format!(
            "net: hosts entry {index} has {} bytes; at most {MAX_HOSTS_ENTRY} are allowed",
            raw.len()
        ));
    }
    let mut words = raw
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|w| !w.is_empty());
    let first = words.next().unwrap_or(b"");
    let address = std::str::from_utf8(first)
        .ok()
        .and_then(|text| text.parse::<Ipv4Addr>().ok())
        .ok_or_else(|| {
            format!(
                "net: hosts entry {index}: {} is not an IPv4 address",
                shown(first)
            )
        })?;
    let mut names = Vec::new();
    for word in words {
        if !is_host_name(word) {
            return Err(format!(
                "net: hosts entry {index}: {} is not a valid host name",
                shown(word)
            ));
        }
        names.push(String::from_utf8_lossy(word).into_owned());
    }
    if names.is_empty() {
        return Err(format!("net: hosts entry {index} names no host"));
    }
    Ok(HostsEntry { address, names })
}

fn parse_hosts(fields: &Fields<'_>) -> Result<Vec<HostsEntry>, String> {
    let list = fields.list(HOSTS).unwrap_or(&[]);
    if list.len() > MAX_HOSTS {
        return Err(format!(
            "net: hosts has {} entries; at most {MAX_HOSTS} are allowed",
            list.len()
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, raw)| parse_hosts_entry(i, raw))
        .collect()
}

fn parse_hostname(fields: &Fields<'_>) -> Result<Option<String>, String> {
    match fields.bytes(HOSTNAME) {
        None => Ok(None),
        Some(raw) if is_host_name(raw) && raw.len() <= MAX_HOSTNAME => {
            Ok(Some(String::from_utf8_lossy(raw).into_owned()))
        }
        Some(raw) => Err(format!(
            "net: hostname {} is not a valid host name of at most {MAX_HOSTNAME} bytes",
            shown(raw)
        )),
    }
}

fn parse_mtu(fields: &Fields<'_>) -> Result<u32, String> {
    match fields.uint(MTU).unwrap_or(DEFAULT_MTU) {
        m @ MIN_MTU..=MAX_MTU => Ok(m as u32),
        m => Err(format!(
            "net: mtu {m} is not between {MIN_MTU} and {MAX_MTU}"
        )),
    }
}

fn parse_flag(fields: &Fields<'_>, tag: u8, name: &str) -> Result<bool, String> {
    match fields.uint(tag).unwrap_or(0) {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(format!("net: {name} must be 0 or 1, got {v}")),
    }
}

/// Checks every field of a `net` request; `Err` is a one-line request error naming the field.
pub fn prepare(fields: &Fields<'_>) -> Result<Config, String> {
    let mac = parse_mac(fields)?;
    let address = ipv4(required_bytes(fields, ADDRESS, "address")?, "address")?;
    check_unicast(address, "address", false)?;
    let prefix = parse_prefix(fields)?;
    let network = Ipv4Addr::from(u32::from(address) & mask(prefix));
    check_in_subnet(address, "address", network, prefix)?;
    let gateway = ipv4(required_bytes(fields, GATEWAY, "gateway")?, "gateway")?;
    check_in_subnet(gateway, "gateway", network, prefix)?;
    if gateway == address {
        return Err(format!("net: gateway {gateway} is the address itself"));
    }
    Ok(Config {
        mac,
        address,
        prefix,
        gateway,
        dns: parse_dns(fields)?,
        hosts: parse_hosts(fields)?,
        hostname: parse_hostname(fields)?,
        mtu: parse_mtu(fields)?,
        reset_connections: parse_flag(fields, RESET_CONNECTIONS, "reset_connections")?,
    })
}

fn set_hostname(name: &str) -> Result<(), Failure> {
    // SAFETY: sethostname reads exactly `len` bytes from the string's buffer (no NUL needed),
    // which `name` borrows for the call; `prepare` kept the length within the kernel's limit.
    let ret = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    sys::cvt(ret)
        .map(|_| ())
        .map_err(|e| Failure::os("set the host name", e))
}

/// Applies `config`; returns the interface's name and the number of connections destroyed.
fn apply(config: &Config) -> Result<(String, u64), Failure> {
    let name = netif::find_ethernet()?;
    netif::configure(&name, config)?;
    netetc::write(config)?;
    if let Some(hostname) = &config.hostname {
        set_hostname(hostname)?;
    }
    let reset = if config.reset_connections {
        sockdiag::destroy_tcp_connections()?
    } else {
        0
    };
    Ok((name, reset))
}

pub fn run(conn: &Conn, frame: &Frame, ctx: &Context) -> Result<(), End> {
    let fields = Conn::decode(frame, SCHEMA)?;
    let config = match prepare(&fields) {
        Ok(config) => config,
        Err(message) => return conn.reply_error("request", None, &message),
    };
    // Outside a VM the interface, /etc and the host name are the machine's own unless the agent
    // was started in namespaces of its own, which only its caller knows.
    if !ctx.pid1 && !ctx.allow_net_config {
        let message = "net: outside a VM the agent changes the network only when started with \
                       --allow-net-config (in namespaces of its own)";
        return conn.reply_error("request", None, message);
    }
    let outcome = {
        let _serialised = NET_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        apply(&config)
    };
    match outcome {
        Ok((interface, reset)) => {
            let payload = Encoder::new()
                .bytes(OK_INTERFACE, interface.as_bytes())
                .uint(OK_RESET, reset)
                .finish();
            proto::send(conn.fd(), kind::OK, &payload)?;
            Ok(())
        }
        Err(Failure::Request(message)) => conn.reply_error("request", None, &message),
        Err(Failure::Os { step, err }) => {
            let message = format!("net: {step}: {}", sys::errno_text(&err));
            conn.reply_error("os", err.raw_os_error(), &message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(tag: u8, items: &[&[u8]]) -> Vec<u8> {
        let mut out = vec![tag, LIST];
        out.extend_from_slice(&(items.len() as u32).to_le_bytes());
        for item in items {
            out.extend_from_slice(&(item.len() as u32).to_le_bytes());
            out.extend_from_slice(item);
        }
        out
    }

    /// A valid request with `change` applied to its encoder, then `extra` encoded fields.
    fn payload(skip: u8, change: impl FnOnce(Encoder) -> Encoder, extra: &[u8]) -> Vec<u8> {
        let mut enc = Encoder::new();
        if skip != MAC {
            enc = enc.bytes(MAC, &[2, 0, 0, 0, 0, 1]);
        }
        if skip != ADDRESS {
            enc = enc.bytes(ADDRESS, &[10, 0, 2, 15]);
        }
        if skip != PREFIX {
            enc = enc.uint(PREFIX, 24);
        }
        if skip != GATEWAY {
            enc = enc.bytes(GATEWAY, &[10, 0, 2, 2]);
        }
        let mut out = change(enc).finish();
        out.extend_from_slice(extra);
        out
    }

    fn check(payload: &[u8]) -> Result<Config, String> {
        let fields = Fields::decode(payload, SCHEMA).expect("well-formed fields");
        prepare(&fields)
    }

    fn refused(payload: &[u8]) -> String {
        match check(payload) {
            Ok(_) => panic!("accepted"),
            Err(message) => message,
        }
    }

    #[test]
    fn a_valid_request_takes_defaults() {
        let c = check(&payload(0, |e| e, &[])).unwrap();
        assert_eq!(c.mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!((c.address, c.prefix), (Ipv4Addr::new(10, 0, 2, 15), 24));
        assert_eq!(c.gateway, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(
            (c.netmask(), c.broadcast()),
            (
                "255.255.255.0".parse().unwrap(),
                "10.0.2.255".parse().unwrap()
            )
        );
        assert_eq!((c.mtu, c.reset_connections), (1500, false));
        assert!(c.dns.is_empty() && c.hosts.is_empty() && c.hostname.is_none());
    }

    #[test]
    fn every_field_is_read() {
        let extra = [
            list(DNS, &[&[10, 0, 2, 3], &[127, 0, 0, 53]]),
            list(HOSTS, &[b"10.0.2.2  host gw.internal", b"0.0.0.0\tblocked"]),
        ]
        .concat();
        let change = |e: Encoder| {
            e.bytes(HOSTNAME, b"box-1")
                .uint(MTU, 9000)
                .uint(RESET_CONNECTIONS, 1)
        };
        let c = check(&payload(0, change, &extra)).unwrap();
        assert_eq!(
            c.dns,
            [Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(127, 0, 0, 53)]
        );
        assert_eq!(c.hosts.len(), 2);
        assert_eq!(c.hosts[0].names, ["host", "gw.internal"]);
        assert_eq!(c.hosts[1].address, Ipv4Addr::UNSPECIFIED);
        assert_eq!(c.hostname.as_deref(), Some("box-1"));
        assert_eq!((c.mtu, c.reset_connections), (9000, true));
    }

    #[test]
    fn required_fields_are_named() {
        for (tag, name) in [
            (MAC, "mac"),
            (ADDRESS, "address"),
            (PREFIX, "prefix"),
            (GATEWAY, "gateway"),
        ] {
            assert_eq!(
                refused(&payload(tag, |e| e, &[])),
                format!("net: {name} is required")
            );
        }
    }

    #[test]
    fn bad_values_are_refused_naming_the_field() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                payload(MAC, |e| e.bytes(MAC, &[2, 0, 0, 0, 1]), &[]),
                "mac must be 6 bytes",
            ),
            (
                payload(MAC, |e| e.bytes(MAC, &[3, 0, 0, 0, 0, 1]), &[]),
                "mac 03:00:00:00:00:01 is a multicast",
            ),
            (
                payload(MAC, |e| e.bytes(MAC, &[0; 6]), &[]),
                "mac 00:00:00:00:00:00",
            ),
            (
                payload(ADDRESS, |e| e.bytes(ADDRESS, &[10, 0, 2]), &[]),
                "address must be 4 bytes",
            ),
            (
                payload(ADDRESS, |e| e.bytes(ADDRESS, &[127, 0, 2, 15]), &[]),
                "address 127.0.2.15 is not a unicast",
            ),
            (
                payload(ADDRESS, |e| e.bytes(ADDRESS, &[10, 0, 2, 255]), &[]),
                "address 10.0.2.255 is the network or broadcast",
            ),
            (
                payload(PREFIX, |e| e.uint(PREFIX, 0), &[]),
                "prefix 0 is not between 1 and 30",
            ),
            (payload(PREFIX, |e| e.uint(PREFIX, 31), &[]), "prefix 31"),
            (payload(PREFIX, |e| e.uint(PREFIX, 33), &[]), "prefix 33"),
            (
                payload(GATEWAY, |e| e.bytes(GATEWAY, &[10, 0, 3, 2]), &[]),
                "gateway 10.0.3.2 is outside 10.0.2.0/24",
            ),
            (
                payload(GATEWAY, |e| e.bytes(GATEWAY, &[10, 0, 2, 15]), &[]),
                "gateway 10.0.2.15 is the address itself",
            ),
            (
                payload(GATEWAY, |e| e.bytes(GATEWAY, &[10, 0, 2, 0]), &[]),
                "gateway 10.0.2.0 is the network",
            ),
            (
                payload(0, |e| e, &list(DNS, &[&[1u8, 1, 1, 1][..]; 4])),
                "dns has 4 servers",
            ),
            (
                payload(0, |e| e, &list(DNS, &[&[1, 1, 1]])),
                "dns server must be 4 bytes",
            ),
            (
                payload(0, |e| e, &list(DNS, &[&[224, 0, 0, 1]])),
                "dns server 224.0.0.1 is not a unicast",
            ),
            (
                payload(0, |e| e, &list(HOSTS, &[&b"10.0.0.1 a"[..]; 65])),
                "hosts has 65 entries",
            ),
            (
                payload(0, |e| e, &list(HOSTS, &[b"10.0.0.1 a/b"])),
                "hosts entry 0: \"a/b\" is not a valid host name",
            ),
            (
                payload(0, |e| e, &list(HOSTS, &[b"10.0.0.1 a\nb"])),
                "hosts entry 0: \"a\\nb\" is not a valid host name",
            ),
            (
                payload(0, |e| e, &list(HOSTS, &[b"10.0.0.1 a", b"10.0.0.01 b"])),
                "hosts entry 1: \"10.0.0.01\" is not an IPv4",
            ),
            (
                payload(0, |e| e, &list(HOSTS, &[b"10.0.0.1  "])),
                "hosts entry 0 names no host",
            ),
            (
                payload(0, |e| e, &list(HOSTS, &[&[b'a'; 256]])),
                "hosts entry 0 has 256 bytes",
            ),
            (
                payload(0, |e| e.bytes(HOSTNAME, b"a/b"), &[]),
                "hostname \"a/b\" is not a valid host name",
            ),
            (
                payload(0, |e| e.bytes(HOSTNAME, b"box\n"), &[]),
                "hostname \"box\\n\"",
            ),
            (
                payload(0, |e| e.bytes(HOSTNAME, &[b'a'; 65]), &[]),
                "hostname \"aaaa",
            ),
            (
                payload(0, |e| e.uint(MTU, 67), &[]),
                "mtu 67 is not between 68 and 65535",
            ),
            (payload(0, |e| e.uint(MTU, 65536), &[]), "mtu 65536"),
            (
                payload(0, |e| e.uint(RESET_CONNECTIONS, 2), &[]),
                "reset_connections must be 0 or 1, got 2",
            ),
        ];
        for (payload, expected) in cases {
            let message = refused(&payload);
            assert!(
                message.starts_with(&format!("net: {expected}")),
                "{message:?} lacks {expected:?}"
            );
            assert!(!message.contains('\n'));
        }
    }

    #[test]
    fn host_names() {
        for good in [
            &b"a"[..],
            b"localhost",
            b"x-1.example.com",
            b"1e100",
            &[b'a'; 63],
        ] {
            assert!(is_host_name(good), "{good:?}");
        }
        let long_label = [b'a'; 64];
        let long_name = [
            &[b'a'; 63][..],
            b".",
            &[b'a'; 63],
            b".",
            &[b'a'; 63],
            b".",
            &[b'a'; 63],
        ]
        .concat();
        for bad in [
            &b""[..],
            b"-a",
            b"a-",
            b"a..b",
            b"a.",
            b".a",
            b"a_b",
            b"a b",
            b"a/b",
            b"\xc3\xa9",
            &long_label,
            &long_name,
        ] {
            assert!(!is_host_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn shown_is_one_short_line() {
        assert_eq!(shown(b"a\nb"), "\"a\\nb\"");
        let long = shown(&[b'x'; 1000]);
        assert!(long.len() < 80 && long.ends_with('…'));
    }
}
