//! The egress policy as configured: networks, domain patterns, rules and their checks.
//!
//! Everything here is plain data with serde (a policy is part of a VM's configuration) and the
//! parsers behind it. Networks and domain patterns serialize as the strings a user writes
//! (`"10.0.0.0/8"`, `"1.2.3.4"`, `"example.com"`, `"*.example.com"`), so a policy file reads
//! like a docker or firewall configuration.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Most rules a policy may have: the filter looks at every rule for some frames.
pub const MAX_RULES: usize = 256;
/// Most published ports (TCP and UDP together) one policy may name.
pub const MAX_PUBLISHED: usize = 128;
/// Longest domain name in its dotted form, without the trailing dot (RFC 1035).
pub const MAX_DOMAIN_LEN: usize = 253;
/// Longest label of a domain name (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;

/// Why a network, a domain pattern or a policy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("\"{text}\" is not an IPv4 network: {reason}")]
    Network { text: String, reason: String },
    #[error("\"{text}\" is not a domain name or pattern: {reason}")]
    Domain { text: String, reason: String },
    #[error("the policy has {count} rules, but at most {MAX_RULES} are allowed")]
    TooManyRules { count: usize },
    #[error("rule {index} ({rule}) is invalid: {reason}")]
    Rule {
        /// Position in `rules`, counted from 0 (as in the filter's drop reasons and counters).
        index: usize,
        /// The rule as written, e.g. `deny 10.0.0.0/8`.
        rule: String,
        reason: String,
    },
    #[error("the policy publishes {count} ports, but at most {MAX_PUBLISHED} are allowed")]
    TooManyPublished { count: usize },
    #[error("the DNS resolver {addr} is not a unicast address")]
    Dns { addr: Ipv4Addr },
}

fn network_error(text: &str, reason: impl Into<String>) -> PolicyError {
    PolicyError::Network {
        text: text.to_owned(),
        reason: reason.into(),
    }
}

fn domain_error(text: &str, reason: impl Into<String>) -> PolicyError {
    PolicyError::Domain {
        text: text.to_owned(),
        reason: reason.into(),
    }
}

/// The network mask of a prefix length; lengths past 32 count as 32, so a [`Cidr`] built by
/// hand with a bad prefix still behaves (as a single address) until `check()` refuses it.
const fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else if prefix >= 32 {
        u32::MAX
    } else {
        u32::MAX << (32 - prefix)
    }
}

/// An IPv4 network, written `"10.0.0.0/8"` or `"1.2.3.4"` (= `/32`).
///
/// Parsing masks host bits set beyond the prefix (`"10.1.2.3/8"` is `10.0.0.0/8`, as docker
/// does) and refuses prefixes past 32, IPv6 and anything else that is not an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    /// The network of `addr` with `prefix` bits, host bits cleared.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Cidr, PolicyError> {
        if prefix > 32 {
            return Err(network_error(
                &format!("{addr}/{prefix}"),
                "the prefix length is more than 32",
            ));
        }
        Ok(Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        })
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(ip) ^ u32::from(self.addr)) & mask(self.prefix) == 0
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = PolicyError;

    fn from_str(text: &str) -> Result<Cidr, PolicyError> {
        if text.contains(':') {
            return Err(network_error(
                text,
                "IPv6 is not supported (guests have IPv4 only)",
            ));
        }
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| {
            network_error(
                text,
                format!("\"{addr}\" is not a dotted-quad IPv4 address like 10.0.0.0"),
            )
        })?;
        let prefix = match prefix {
            None => 32,
            // Digits only: `u8::from_str` would also take "+8".
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().unwrap_or(u8::MAX)
            }
            Some(p) => {
                return Err(network_error(
                    text,
                    format!("the prefix length \"{p}\" is not a number from 0 to 32"),
                ))
            }
        };
        if prefix > 32 {
            return Err(network_error(text, "the prefix length is more than 32"));
        }
        Cidr::new(addr, prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Allow or deny.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

/// A domain name (`"example.com"`: that name only) or every name below one
/// (`"*.example.com"`: `a.example.com`, `a.b.example.com`, but not `example.com` itself).
///
/// Names are ASCII letters, digits and hyphens in labels of 1 to 63 bytes, at most 253 bytes
/// in all; case does not matter and a trailing dot is ignored. The pattern keeps the name in
/// DNS wire form (length-prefixed labels, lower case), which is what DNS answers are matched
/// in: a label with a dot inside it (legal on the wire) can never pass for two labels.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct DomainPattern {
    wildcard: bool,
    /// The name (below the `*.` of a wildcard) in wire form without the root label.
    wire: Box<[u8]>,
}

impl DomainPattern {
    /// True for `*.name` patterns.
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// The name (below the `*.` of a wildcard), lower case, dotted, without a trailing dot.
    pub fn name(&self) -> String {
        let mut out = String::with_capacity(self.wire.len());
        for label in labels(&self.wire) {
            if !out.is_empty() {
                out.push('.');
            }
            // Only ASCII letters, digits and hyphens get into a pattern.
            out.extend(label.iter().map(|&b| char::from(b)));
        }
        out
    }

    /// Whether a dotted name (any case, trailing dot or not) is matched.
    pub fn matches(&self, name: &str) -> bool {
        let mut wire = Vec::with_capacity(name.len() + 1);
        let name = name.strip_suffix('.').unwrap_or(name);
        for label in name.split('.') {
            if label.is_empty() || label.len() > MAX_LABEL_LEN {
                return false;
            }
            wire.push(label.len() as u8);
            wire.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
        self.matches_wire(&wire)
    }

    /// Whether a name in wire form (length-prefixed labels, lower case, no root label) is
    /// matched. Allocation-free: this runs on DNS answers.
    pub(crate) fn matches_wire(&self, name: &[u8]) -> bool {
        if !self.wildcard {
            return name == &self.wire[..];
        }
        // A wildcard matches when the name is one or more whole labels followed by the pattern.
        let mut at = 0;
        while at < name.len() {
            at += 1 + usize::from(name[at]);
            if at < name.len() && name.len() - at == self.wire.len() {
                return name[at..] == self.wire[..];
            }
        }
        false
    }

    /// Checks the name as [`FromStr`] does (also used by `check()`, for patterns made otherwise).
    fn validate(&self) -> Result<(), String> {
        validate_name(&self.name())
    }
}

/// The labels of a wire-form name (well formed: made by this module).
fn labels(wire: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = wire;
    std::iter::from_fn(move || {
        let (&len, tail) = rest.split_first()?;
        let (label, tail) = tail.split_at(usize::from(len).min(tail.len()));
        rest = tail;
        Some(label)
    })
}

/// Checks a dotted name without a trailing dot and without a `*.` prefix.
fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.len() > MAX_DOMAIN_LEN {
        return Err(format!(
            "the name is {} bytes long, but at most {MAX_DOMAIN_LEN} are allowed",
            name.len()
        ));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("the name has an empty label (two dots in a row, or a leading dot)".into());
        }
        if label.contains('*') {
            return Err("a wildcard may only be the whole first label, as in *.example.com".into());
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!(
                "the label \"{label}\" is {} bytes long, but at most {MAX_LABEL_LEN} are allowed",
                label.len()
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!(
                "the label \"{label}\" holds a character other than ASCII letters, digits and hyphens"
            ));
        }
    }
    Ok(())
}

impl FromStr for DomainPattern {
    type Err = PolicyError;

    fn from_str(text: &str) -> Result<DomainPattern, PolicyError> {
        let name = text.strip_suffix('.').unwrap_or(text);
        let (wildcard, name) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, name),
        };
        if name == "*" || name.is_empty() && wildcard {
            return Err(domain_error(
                text,
                "a pattern must name a domain below the wildcard, as in *.example.com",
            ));
        }
        validate_name(name).map_err(|reason| domain_error(text, reason))?;
        let mut wire = Vec::with_capacity(name.len() + 1);
        for label in name.split('.') {
            wire.push(label.len() as u8);
            wire.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
        Ok(DomainPattern {
            wildcard,
            wire: wire.into(),
        })
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.name())
    }
}

impl fmt::Debug for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DomainPattern(\"{self}\")")
    }
}

/// What a rule applies to: a network or the addresses DNS gives for names.
///
/// Written as one string: an address or network (`"10.0.0.0/8"`, `"1.2.3.4"`) or a domain
/// pattern (`"example.com"`, `"*.example.com"`). A string with a `/`, or whose last label is
/// all digits, is read as a network (no top-level domain is numeric), anything else as a name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Net(Cidr),
    Domain(DomainPattern),
}

impl FromStr for Target {
    type Err = PolicyError;

    fn from_str(text: &str) -> Result<Target, PolicyError> {
        if text.contains(':') {
            return text.parse().map(Target::Net); // refused, with the IPv6 sentence
        }
        if text.starts_with('*') {
            return text.parse().map(Target::Domain);
        }
        let trimmed = text.strip_suffix('.').unwrap_or(text);
        let last = trimmed.rsplit('.').next().unwrap_or("");
        if text.contains('/') || !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) {
            text.parse().map(Target::Net)
        } else {
            text.parse().map(Target::Domain)
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Net(c) => c.fmt(f),
            Target::Domain(d) => d.fmt(f),
        }
    }
}

impl Serialize for Target {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Target, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One rule: `{"action": "deny", "target": "10.0.0.0/8"}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub action: Action,
    pub target: Target,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.action, self.target)
    }
}

/// The address ranges denied unless a user rule covers the destination (see
/// [`EgressPolicy`]): name and network. Order matters only for counter indices.
pub const BUILTIN_DENY: &[(&str, Cidr)] = &[
    ("this network", net(0, 0, 0, 0, 8)),
    ("private", net(10, 0, 0, 0, 8)),
    ("shared address space", net(100, 64, 0, 0, 10)),
    ("loopback", net(127, 0, 0, 0, 8)),
    ("link-local and cloud metadata", net(169, 254, 0, 0, 16)),
    ("private", net(172, 16, 0, 0, 12)),
    ("IETF protocol assignments", net(192, 0, 0, 0, 24)),
    ("private", net(192, 168, 0, 0, 16)),
    ("benchmarking", net(198, 18, 0, 0, 15)),
    ("multicast", net(224, 0, 0, 0, 4)),
    ("reserved and broadcast", net(240, 0, 0, 0, 4)),
];

const fn net(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Cidr {
    Cidr {
        addr: Ipv4Addr::new(a, b, c, d),
        prefix,
    }
}

/// The whole egress policy of a VM, applied by [`super::EgressFilter`] to every frame the
/// guest sends.
///
/// For a packet to destination D, in this order:
/// 1. A UDP or TCP packet to port 53 of `dns` (unfragmented, transport header complete)
///    passes: the guest can always reach its resolver, and only on that port. So does a packet
///    of a flow that a learned allowed address let out earlier and that is still active (see
///    [`super::EgressFilter::inbound`]).
/// 2. Among the user rules that cover D, the most specific decides: a network rule covers
///    the addresses in it, a domain rule the addresses DNS answers gave for its names (each
///    counting as a /32) until their TTL runs out. When an allow and a deny rule are equally
///    specific, deny wins.
/// 3. If no user rule covers D and it lies in a [`BUILTIN_DENY`] range, it is dropped: private,
///    loopback, link-local (cloud metadata) and similar ranges need an explicit allow rule.
///    Any user allow rule covering D lifts them, including a broad one such as `0.0.0.0/0`.
/// 4. Otherwise `default_action` decides.
///
/// Domain rules learn addresses from the DNS answers of `dns` (UDP only): see
/// [`super::EgressFilter::inbound`] for what that can and cannot promise.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicy {
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// The guest's DNS resolver: exempt on port 53, and the only source of learned addresses.
    #[serde(default)]
    pub dns: Option<Ipv4Addr>,
    #[serde(default)]
    pub default_action: Action,
    /// Guest TCP ports published on the host: the guest may answer the connections made to
    /// them, whatever the rules say of the peer (see [`super::EgressFilter::inbound`]).
    #[serde(default)]
    pub published_tcp: Vec<u16>,
    /// Guest UDP ports published on the host, likewise for the datagrams sent to them.
    #[serde(default)]
    pub published_udp: Vec<u16>,
}

impl EgressPolicy {
    /// Checks the bounds a policy must keep: at most [`MAX_RULES`] rules, network prefixes of at
    /// most 32 bits, valid domain patterns, a unicast resolver, and a resolver at all when a
    /// rule names a domain (domain rules learn only from its answers).
    pub fn check(&self) -> Result<(), PolicyError> {
        if self.rules.len() > MAX_RULES {
            return Err(PolicyError::TooManyRules {
                count: self.rules.len(),
            });
        }
        let published = self.published_tcp.len() + self.published_udp.len();
        if published > MAX_PUBLISHED {
            return Err(PolicyError::TooManyPublished { count: published });
        }
        if let Some(addr) = self.dns {
            if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
                return Err(PolicyError::Dns { addr });
            }
        }
        for (index, rule) in self.rules.iter().enumerate() {
            let bad = |reason: String| PolicyError::Rule {
                index,
                rule: rule.to_string(),
                reason,
            };
            match &rule.target {
                Target::Net(c) if c.prefix > 32 => {
                    return Err(bad("the prefix length is more than 32".into()));
                }
                Target::Net(_) => {}
                Target::Domain(d) => {
                    d.validate().map_err(bad)?;
                    if self.dns.is_none() {
                        return Err(bad(
                            "it names a domain, but the policy has no DNS resolver to learn \
                             addresses from"
                                .into(),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_parses_masks_and_refuses() {
        assert_eq!(cidr("10.0.0.0/8"), net(10, 0, 0, 0, 8));
        assert_eq!(cidr("1.2.3.4"), net(1, 2, 3, 4, 32));
        assert_eq!(
            cidr("10.1.2.3/8"),
            net(10, 0, 0, 0, 8),
            "host bits are masked"
        );
        assert_eq!(cidr("0.0.0.0/0"), net(0, 0, 0, 0, 0));
        assert_eq!(cidr("255.255.255.255/1"), net(128, 0, 0, 0, 1));
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/8/8",
            "10.0.0.0/256",
            "10.0.0/8",
            "010.0.0.1",
            "10.0.0.0 /8",
            "::1",
            "fd00::/8",
            "",
            "example.com",
            "1.2.3.4.5",
        ] {
            let err = bad.parse::<Cidr>().unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("\"{bad}\" is not an IPv4 network: ")),
                "{msg}"
            );
            assert!(!msg.contains('\n'));
        }
        assert!("::1"
            .parse::<Cidr>()
            .unwrap_err()
            .to_string()
            .contains("IPv6"));
        assert!(Cidr::new(Ipv4Addr::LOCALHOST, 33).is_err());
    }

    #[test]
    fn cidr_contains() {
        let c = cidr("172.16.0.0/12");
        assert!(c.contains(Ipv4Addr::new(172, 16, 0, 0)));
        assert!(c.contains(Ipv4Addr::new(172, 31, 255, 255)));
        assert!(!c.contains(Ipv4Addr::new(172, 32, 0, 0)));
        assert!(!c.contains(Ipv4Addr::new(172, 15, 255, 255)));
        assert!(cidr("0.0.0.0/0").contains(Ipv4Addr::BROADCAST));
        let one = cidr("1.2.3.4");
        assert!(one.contains(Ipv4Addr::new(1, 2, 3, 4)));
        assert!(!one.contains(Ipv4Addr::new(1, 2, 3, 5)));
        // Made by hand past 32 bits: a single address, no overflow.
        let odd = Cidr {
            addr: Ipv4Addr::new(1, 2, 3, 4),
            prefix: 200,
        };
        assert!(odd.contains(Ipv4Addr::new(1, 2, 3, 4)));
        assert!(!odd.contains(Ipv4Addr::new(1, 2, 3, 5)));
    }

    #[test]
    fn builtin_ranges_are_what_they_say() {
        for (name, c) in BUILTIN_DENY {
            assert_eq!(*c, cidr(&c.to_string()), "{name}: host bits or prefix");
        }
        let metadata = Ipv4Addr::new(169, 254, 169, 254);
        let hits: Vec<_> = BUILTIN_DENY
            .iter()
            .filter(|(_, c)| c.contains(metadata))
            .collect();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].0, "link-local and cloud metadata");
    }

    #[test]
    fn domain_patterns() {
        let exact: DomainPattern = "Example.COM.".parse().unwrap();
        assert_eq!(exact.to_string(), "example.com");
        assert!(exact.matches("example.com"));
        assert!(exact.matches("EXAMPLE.com."));
        assert!(!exact.matches("www.example.com"));
        assert!(!exact.matches("example.co"));
        assert!(!exact.matches("xexample.com"));

        let wild: DomainPattern = "*.example.com".parse().unwrap();
        assert!(wild.is_wildcard());
        assert_eq!(wild.name(), "example.com");
        assert!(wild.matches("a.example.com"));
        assert!(wild.matches("A.B.Example.Com."));
        assert!(!wild.matches("example.com"), "not the apex");
        assert!(!wild.matches("aexample.com"));
        assert!(!wild.matches("a.example.com.evil"));
        assert!(!wild.matches("a..example.com"));

        // A label holding a dot (legal on the wire) is not two labels.
        let mut wire = vec![9];
        wire.extend(b"a.example");
        wire.push(3);
        wire.extend(b"com");
        assert!(!exact.matches_wire(&wire));
        assert!(!wild.matches_wire(&wire));
        // A hostile wire name whose length bytes overrun the end.
        assert!(!wild.matches_wire(&[60, b'a']));
        assert!(!wild.matches_wire(&[]));

        for bad in [
            "",
            ".",
            "*",
            "*.",
            "**.example.com",
            "a.*.example.com",
            "*example.com",
            "ex ample.com",
            "ex_ample.com",
            "exa..mple.com",
            ".example.com",
            "bücher.de",
        ] {
            let msg = bad.parse::<DomainPattern>().unwrap_err().to_string();
            assert!(
                msg.starts_with(&format!("\"{bad}\" is not a domain name or pattern: ")),
                "{msg}"
            );
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(long_label.parse::<DomainPattern>().is_err());
        assert!(format!("{}.com", "a".repeat(63))
            .parse::<DomainPattern>()
            .is_ok());
        let long_name = ["a".repeat(63).as_str(); 4].join("."); // 255 bytes
        assert!(long_name.parse::<DomainPattern>().is_err());
        assert!(long_name[2..].parse::<DomainPattern>().is_ok()); // 253 bytes
    }

    #[test]
    fn targets_and_rules_serialize_as_strings() {
        let policy: EgressPolicy = serde_json::from_str(
            r#"{"rules": [
                {"action": "deny", "target": "10.1.2.3/8"},
                {"action": "allow", "target": "1.2.3.4"},
                {"action": "allow", "target": "*.Example.com"},
                {"action": "deny", "target": "example.org."}
            ], "dns": "10.0.2.3", "default_action": "deny"}"#,
        )
        .unwrap();
        assert_eq!(policy.rules[0].target, Target::Net(cidr("10.0.0.0/8")));
        assert_eq!(policy.rules[1].target, Target::Net(cidr("1.2.3.4/32")));
        assert!(matches!(&policy.rules[2].target, Target::Domain(d) if d.is_wildcard()));
        assert_eq!(policy.rules[3].to_string(), "deny example.org");
        assert_eq!(policy.default_action, Action::Deny);
        policy.check().unwrap();
        let json = serde_json::to_string(&policy).unwrap();
        assert!(json.contains(r#""target":"*.example.com""#), "{json}");
        assert!(json.contains(r#""target":"10.0.0.0/8""#), "{json}");
        let back: EgressPolicy = serde_json::from_str(&json).unwrap();
        assert_eq!(back, policy);
        // postcard (not self-describing), as snapshots and the worker protocol may carry it.
        let bytes = postcard::to_stdvec(&policy).unwrap();
        assert_eq!(
            postcard::from_bytes::<EgressPolicy>(&bytes).unwrap(),
            policy
        );

        let empty: EgressPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, EgressPolicy::default());
        assert_eq!(empty.default_action, Action::Allow);

        for (json, says) in [
            (
                r#"{"rules": [{"action": "deny", "target": "10.0.0.0/33"}]}"#,
                "10.0.0.0/33",
            ),
            (
                r#"{"rules": [{"action": "deny", "target": "fd00::/8"}]}"#,
                "IPv6",
            ),
            (
                r#"{"rules": [{"action": "deny", "target": "a_b.com"}]}"#,
                "a_b",
            ),
            (
                r#"{"rules": [{"action": "block", "target": "a.com"}]}"#,
                "block",
            ),
            (r#"{"rules": [], "dfault_action": "deny"}"#, "dfault_action"),
        ] {
            let err = serde_json::from_str::<EgressPolicy>(json)
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{json}: {err}");
        }
        assert_eq!(
            "1.2.3".parse::<Target>().unwrap_err().to_string(),
            "\"1.2.3\" is not an IPv4 network: \"1.2.3\" is not a dotted-quad IPv4 address like 10.0.0.0"
        );
    }

    #[test]
    fn check_bounds_and_names_the_bad_rule() {
        let rule = |action, target: &str| Rule {
            action,
            target: target.parse().unwrap(),
        };
        let mut policy = EgressPolicy {
            rules: vec![rule(Action::Allow, "1.2.3.4"); MAX_RULES],
            dns: Some(Ipv4Addr::new(10, 0, 2, 3)),
            default_action: Action::Deny,
            ..EgressPolicy::default()
        };
        policy.check().unwrap();
        policy.rules.push(rule(Action::Allow, "1.2.3.4"));
        assert_eq!(
            policy.check().unwrap_err().to_string(),
            "the policy has 257 rules, but at most 256 are allowed"
        );

        let mut policy = EgressPolicy {
            rules: vec![
                rule(Action::Allow, "1.2.3.4"),
                Rule {
                    action: Action::Deny,
                    target: Target::Net(Cidr {
                        addr: Ipv4Addr::new(10, 0, 0, 0),
                        prefix: 40,
                    }),
                },
            ],
            dns: Some(Ipv4Addr::new(10, 0, 2, 3)),
            default_action: Action::Allow,
            ..EgressPolicy::default()
        };
        assert_eq!(
            policy.check().unwrap_err().to_string(),
            "rule 1 (deny 10.0.0.0/40) is invalid: the prefix length is more than 32"
        );
        policy.rules[1] = rule(Action::Deny, "*.example.com");
        policy.check().unwrap();
        policy.dns = None;
        assert_eq!(
            policy.check().unwrap_err().to_string(),
            "rule 1 (deny *.example.com) is invalid: it names a domain, but the policy has no DNS \
             resolver to learn addresses from"
        );
        policy.rules.pop();
        policy.check().unwrap();
        policy.dns = Some(Ipv4Addr::BROADCAST);
        assert_eq!(
            policy.check().unwrap_err().to_string(),
            "the DNS resolver 255.255.255.255 is not a unicast address"
        );
    }
}
