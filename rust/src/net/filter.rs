//! [`EgressFilter`]: the policy applied to frames, with the addresses learned from DNS answers
//! and the counters.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::dns;
use super::frame::{self, Frame, Ipv4};
use super::policy::{Action, Cidr, EgressPolicy, Target, BUILTIN_DENY};

/// Most addresses remembered from DNS answers, counting one per (address, domain rule). When
/// full, the entry learned (or refreshed) longest ago goes first.
pub const MAX_LEARNED: usize = 4096;
/// Bounds of how long a learned address counts: the answer's TTL, clamped to these.
pub const MIN_TTL: Duration = Duration::from_secs(1);
pub const MAX_TTL: Duration = Duration::from_secs(3600);
pub const DNS_PORT: u16 = 53;
/// Most connections (and UDP exchanges) to published ports remembered at once; beyond it new
/// ones get no answer until old ones expire.
pub const MAX_INBOUND_FLOWS: usize = 4096;
/// How long a connection to a published TCP port is remembered after its last segment from
/// the peer.
pub const TCP_FLOW_IDLE: Duration = Duration::from_secs(3600);
/// How long a peer of a published UDP port may be answered after its last datagram.
pub const UDP_FLOW_IDLE: Duration = Duration::from_secs(120);
/// Most connections (and UDP exchanges) remembered at once that a learned address let out;
/// beyond it new ones are not remembered (they still pass while the address counts).
pub const MAX_OUTBOUND_FLOWS: usize = 4096;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// A connection made to a published guest port: protocol, peer address and port, guest port.
/// Or one the guest made: protocol, destination address and port, guest port.
type FlowKey = (u8, u32, u16, u16);

/// The flow a packet the guest sends belongs to: protocol, destination address and port, the
/// guest's port. A connection to a published port is remembered under the same key, seen from
/// the peer's side (its address and port, then the guest's port).
fn outbound_key(ip: &Ipv4<'_>) -> Option<FlowKey> {
    let (protocol, src_port, dst_port, _) = frame::ports(ip)?;
    Some((protocol, u32::from(ip.dst), dst_port, src_port))
}

/// How long a flow is remembered after its last packet.
fn flow_idle(protocol: u8) -> Duration {
    if protocol == frame::PROTO_TCP {
        TCP_FLOW_IDLE
    } else {
        UDP_FLOW_IDLE
    }
}

/// Remembers (or refreshes) `key` until `until`; a new key only while there is room (expired
/// ones are pushed out first).
fn remember(
    flows: &mut HashMap<FlowKey, Instant>,
    cap: usize,
    key: FlowKey,
    until: Instant,
    now: Instant,
) {
    if let Some(known) = flows.get_mut(&key) {
        *known = until;
        return;
    }
    if flows.len() >= cap {
        flows.retain(|_, &mut t| now < t);
        if flows.len() >= cap {
            return;
        }
    }
    flows.insert(key, until);
}

/// What to do with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop(DropReason),
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Shorter than an Ethernet header, or an IPv4 header that contradicts itself.
    Malformed,
    /// Neither IPv4 nor ARP (IPv6, VLAN tags, ...).
    NotIpv4,
    /// A user deny rule, by index into the policy's rules.
    Rule(usize),
    /// A range of [`BUILTIN_DENY`], by index, that no user rule covered.
    Builtin(usize),
    /// No rule covered the destination and the default action is deny.
    Default,
    /// A DNS answer naming a domain of a deny rule (index into the rules).
    DnsAnswer(usize),
}

/// Frames and bytes passed and frames dropped, by reason. Every frame the filter sees is
/// counted exactly once.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct FilterCounters {
    pub passed_out_frames: u64,
    pub passed_out_bytes: u64,
    pub passed_in_frames: u64,
    pub passed_in_bytes: u64,
    pub dropped_malformed: u64,
    pub dropped_not_ipv4: u64,
    /// Per rule of the policy, in its order.
    pub dropped_by_rule: Vec<u64>,
    /// Per entry of [`BUILTIN_DENY`], in its order.
    pub dropped_builtin: Vec<u64>,
    pub dropped_default: u64,
    pub dropped_dns_answers: u64,
}

impl FilterCounters {
    /// Every frame counted, passed or dropped, in either direction.
    pub fn frames(&self) -> u64 {
        let sum = |v: &[u64]| v.iter().fold(0u64, |a, b| a.saturating_add(*b));
        [
            self.passed_out_frames,
            self.passed_in_frames,
            self.dropped_malformed,
            self.dropped_not_ipv4,
            sum(&self.dropped_by_rule),
            sum(&self.dropped_builtin),
            self.dropped_default,
            self.dropped_dns_answers,
        ]
        .iter()
        .fold(0u64, |a, b| a.saturating_add(*b))
    }
}

/// One address learned from a DNS answer for a name a domain rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Learned {
    pub addr: Ipv4Addr,
    /// Index of the domain rule, in the policy's rules.
    pub rule: usize,
    /// It no longer counts from then on (it may stay in the table until pushed out).
    pub expires: Instant,
}

/// The learned addresses: looked up by address for every outbound frame (no allocation), and
/// kept in learning order for eviction.
#[derive(Debug, Default)]
struct LearnedTable {
    /// (address, rule) -> (expiry, sequence number in `by_age`).
    by_key: BTreeMap<(u32, usize), (Instant, u64)>,
    /// Sequence number -> key, oldest first.
    by_age: BTreeMap<u64, (u32, usize)>,
    next_seq: u64,
}

impl LearnedTable {
    fn insert(&mut self, addr: Ipv4Addr, rule: usize, expires: Instant, now: Instant) {
        let key = (u32::from(addr), rule);
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(entry) = self.by_key.get_mut(&key) {
            // Learned again: it counts until the later expiry (the guest may hold either
            // answer) and becomes the newest entry.
            self.by_age.remove(&entry.1);
            entry.0 = entry.0.max(expires);
            entry.1 = seq;
            self.by_age.insert(seq, key);
            return;
        }
        // Expired entries at the old end go first, then the oldest while the table is full.
        while let Some((&old_seq, &old_key)) = self.by_age.first_key_value() {
            let expired = self.by_key.get(&old_key).is_none_or(|e| e.0 <= now);
            if !expired && self.by_key.len() < MAX_LEARNED {
                break;
            }
            self.by_age.remove(&old_seq);
            self.by_key.remove(&old_key);
        }
        self.by_key.insert(key, (expires, seq));
        self.by_age.insert(seq, key);
    }

    /// Whether a live learned address of an allow rule is `addr`, and none of a deny rule.
    fn allows(&self, addr: Ipv4Addr, now: Instant, policy: &EgressPolicy) -> bool {
        matches!(self.best(addr, now, policy), Some((Action::Allow, _)))
    }

    /// The deny rule with the lowest index that learned `addr` (not expired at `now`), else
    /// the allow rule with the lowest index, if any.
    fn best(&self, addr: Ipv4Addr, now: Instant, policy: &EgressPolicy) -> Option<(Action, usize)> {
        let a = u32::from(addr);
        let mut allow = None;
        for (&(_, rule), &(expires, _)) in self.by_key.range((a, 0)..=(a, usize::MAX)) {
            if now >= expires {
                continue;
            }
            match policy.rules[rule].action {
                Action::Deny => return Some((Action::Deny, rule)),
                Action::Allow => {
                    allow.get_or_insert((Action::Allow, rule));
                }
            }
        }
        allow
    }
}

/// The egress policy at work: decides on every frame the guest sends ([`Self::outbound`]),
/// learns addresses from the resolver's answers ([`Self::inbound`]) and counts what it did.
/// Pure state: no I/O, no threads, no clock of its own (every call gets `now`).
#[derive(Debug)]
pub struct EgressFilter {
    policy: EgressPolicy,
    /// The network rules as (network, action, index), most specific first, deny before allow
    /// at equal prefixes, then in policy order: the first that contains a destination is the
    /// one that decides among them.
    net_rules: Vec<(Cidr, Action, usize)>,
    has_domain_rules: bool,
    learned: LearnedTable,
    counters: FilterCounters,
    /// Indices of the domain rules one DNS answer matches (capacity: the number of rules).
    matched: Vec<usize>,
    /// Connections the outside made to published ports, until when they may be answered.
    flows: HashMap<FlowKey, Instant>,
    /// Connections the guest made that a learned address allowed, until when they may go on
    /// without it.
    outbound_flows: HashMap<FlowKey, Instant>,
}

impl EgressFilter {
    /// A filter for `policy`, which should have passed [`EgressPolicy::check`] (the filter
    /// still behaves with one that did not: bad prefixes count as /32).
    pub fn new(policy: EgressPolicy) -> Self {
        let mut net_rules: Vec<(Cidr, Action, usize)> = policy
            .rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match r.target {
                Target::Net(c) => Some((c, r.action, i)),
                Target::Domain(_) => None,
            })
            .collect();
        net_rules.sort_by_key(|&(c, action, i)| {
            (
                std::cmp::Reverse(c.prefix.min(32)),
                action == Action::Allow,
                i,
            )
        });
        let has_domain_rules = policy
            .rules
            .iter()
            .any(|r| matches!(r.target, Target::Domain(_)));
        let counters = FilterCounters {
            dropped_by_rule: vec![0; policy.rules.len()],
            dropped_builtin: vec![0; BUILTIN_DENY.len()],
            ..FilterCounters::default()
        };
        EgressFilter {
            matched: Vec::with_capacity(policy.rules.len()),
            policy,
            net_rules,
            has_domain_rules,
            learned: LearnedTable::default(),
            counters,
            flows: HashMap::new(),
            outbound_flows: HashMap::new(),
        }
    }

    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// A frame the guest sent (Ethernet, no virtio-net header). Decides and counts.
    pub fn outbound(&mut self, frame: &[u8], now: Instant) -> Verdict {
        let verdict = self.decide_outbound(frame, now);
        self.count(verdict, frame.len(), true);
        verdict
    }

    /// A frame for the guest (from the backend). Only the resolver's DNS answers over UDP are
    /// looked at: the addresses they give for names a domain rule matches are learned, and an
    /// answer naming a domain of a deny rule is dropped. Everything else passes.
    ///
    /// What the answers are trusted for, and what they cannot give:
    /// * An allow rule learns the addresses answered for the *question* name, following CNAME
    ///   chains inside the message (`www.allowed.example` CNAME `cdn.net` A 1.2.3.4 allows
    ///   1.2.3.4). A name the guest asked that only CNAMEs into an allowed domain does not:
    ///   its authoritative server could name any address.
    /// * A deny rule matches the question and every name of the answer section (owners and
    ///   CNAME targets); such an answer is dropped (the guest's lookup times out rather than
    ///   fails), and the addresses of the chain are learned as denied. This stops ordinary
    ///   resolution; it is no barrier to a guest that gets the address some other way (a name
    ///   it controls pointing there, a hard-coded address): deny those with network rules.
    /// * A malformed answer passes unchanged and teaches nothing (the guest's resolver copes),
    ///   unless a name read before the fault matched a deny rule.
    /// * DNS over TCP is not read: segments may split a message anywhere, and reassembling
    ///   them would take per-connection state. So domain rules learn from UDP answers only (a
    ///   truncated UDP answer that makes the guest retry over TCP teaches what it held, if
    ///   anything), and an answer over TCP for a denied name reaches the guest.
    /// * A learned address counts until its TTL (clamped to [`MIN_TTL`]..=[`MAX_TTL`]) runs
    ///   out; then new connections to it are judged without it. A connection (or UDP exchange:
    ///   protocol, address, both ports) that a learned allow let out goes on after that while
    ///   the guest keeps sending on it, until [`TCP_FLOW_IDLE`] or [`UDP_FLOW_IDLE`] after its
    ///   last packet: a download must not be cut when the answer's TTL runs out (at most
    ///   [`MAX_OUTBOUND_FLOWS`] remembered at once).
    ///
    /// Connections to a published port are remembered too (a TCP SYN without ACK, or any
    /// datagram to a published UDP port, from a given peer address and port), so the guest
    /// may answer them even where the rules refuse the peer (passt makes every connection from
    /// the host appear to come from the gateway, which the built-in ranges deny). Only the
    /// exact peer address, peer port and guest port are answered, until [`TCP_FLOW_IDLE`] or
    /// [`UDP_FLOW_IDLE`] after the peer's last packet; at most [`MAX_INBOUND_FLOWS`] at once.
    pub fn inbound(&mut self, frame: &[u8], now: Instant) -> Verdict {
        let verdict = match frame::parse(frame) {
            Ok(Frame::Ipv4(ip)) => {
                self.track_inbound(&ip, now);
                self.inspect_inbound(&ip, now)
            }
            // Only IPv4 is remembered or inspected; the guest copes with the rest.
            _ => Verdict::Pass,
        };
        self.count(verdict, frame.len(), false);
        verdict
    }

    pub fn counters(&self) -> FilterCounters {
        self.counters.clone()
    }

    /// How many addresses are remembered, expired ones not yet pushed out included (at most
    /// [`MAX_LEARNED`]).
    pub fn learned_len(&self) -> usize {
        self.learned.by_key.len()
    }

    /// The remembered addresses, by address then rule (expired ones included: see
    /// [`Learned::expires`]).
    pub fn learned(&self) -> impl Iterator<Item = Learned> + '_ {
        self.learned
            .by_key
            .iter()
            .map(|(&(addr, rule), &(expires, _))| Learned {
                addr: Ipv4Addr::from(addr),
                rule,
                expires,
            })
    }

    fn decide_outbound(&mut self, frame: &[u8], now: Instant) -> Verdict {
        let ip = match frame::parse(frame) {
            Err(frame::Malformed) => return Verdict::Drop(DropReason::Malformed),
            // The backend answers ARP itself; nothing leaves the host for it.
            Ok(Frame::Arp) => return Verdict::Pass,
            Ok(Frame::Other) => return Verdict::Drop(DropReason::NotIpv4),
            Ok(Frame::Ipv4(ip)) => ip,
        };
        if self.dns_exempt(&ip) || self.answers_inbound(&ip, now) || self.continues(&ip, now) {
            return Verdict::Pass;
        }
        match self.user_rule(ip.dst, now) {
            Some((Action::Allow, _)) => {
                if self.learned.allows(ip.dst, now, &self.policy) {
                    self.track_outbound(&ip, now);
                }
                Verdict::Pass
            }
            Some((Action::Deny, i)) => Verdict::Drop(DropReason::Rule(i)),
            None => match BUILTIN_DENY.iter().position(|(_, c)| c.contains(ip.dst)) {
                Some(i) => Verdict::Drop(DropReason::Builtin(i)),
                None if self.policy.default_action == Action::Deny => {
                    Verdict::Drop(DropReason::Default)
                }
                None => Verdict::Pass,
            },
        }
    }

    /// The resolver on port 53, UDP or TCP, unfragmented, with its transport header whole.
    fn dns_exempt(&self, ip: &Ipv4<'_>) -> bool {
        self.policy.dns == Some(ip.dst) && frame::dst_port(ip) == Some(DNS_PORT)
    }

    /// The user rule that decides for `dst`: the most specific that covers it (a learned
    /// address counts as /32), deny on a tie, the lowest index among equals.
    fn user_rule(&self, dst: Ipv4Addr, now: Instant) -> Option<(Action, usize)> {
        let net = self
            .net_rules
            .iter()
            .find(|(c, _, _)| c.contains(dst))
            .map(|&(c, action, i)| (c.prefix, action, i));
        let learned = if self.has_domain_rules {
            self.learned.best(dst, now, &self.policy)
        } else {
            None
        };
        match (net, learned) {
            (None, l) => l,
            (Some((_, action, i)), None) => Some((action, i)),
            (Some((prefix, _, _)), Some(l)) if prefix < 32 => Some(l),
            (Some((_, action, i)), Some((l_action, l_i))) => Some(match (action, l_action) {
                (Action::Deny, Action::Deny) => (Action::Deny, i.min(l_i)),
                (Action::Deny, Action::Allow) => (Action::Deny, i),
                (Action::Allow, Action::Deny) => (Action::Deny, l_i),
                (Action::Allow, Action::Allow) => (Action::Allow, i.min(l_i)),
            }),
        }
    }

    /// Whether `ip` is the guest answering a connection made to one of its published ports.
    fn answers_inbound(&self, ip: &Ipv4<'_>, now: Instant) -> bool {
        if self.flows.is_empty() {
            return false;
        }
        outbound_key(ip)
            .and_then(|key| self.flows.get(&key))
            .is_some_and(|&until| now < until)
    }

    /// Whether `ip` belongs to a connection a learned address let out that is still active: it
    /// goes on after the address's TTL ran out (refreshing it).
    fn continues(&mut self, ip: &Ipv4<'_>, now: Instant) -> bool {
        if self.outbound_flows.is_empty() {
            return false;
        }
        let Some(key) = outbound_key(ip) else {
            return false;
        };
        match self.outbound_flows.get_mut(&key) {
            Some(until) if now < *until => {
                *until = now + flow_idle(key.0);
                true
            }
            _ => false,
        }
    }

    /// Remembers a connection (or UDP exchange) that a learned address let out.
    fn track_outbound(&mut self, ip: &Ipv4<'_>, now: Instant) {
        let Some(key) = outbound_key(ip) else {
            return;
        };
        let until = now + flow_idle(key.0);
        remember(
            &mut self.outbound_flows,
            MAX_OUTBOUND_FLOWS,
            key,
            until,
            now,
        );
    }

    /// Remembers (or refreshes) a connection the outside makes to a published port.
    fn track_inbound(&mut self, ip: &Ipv4<'_>, now: Instant) {
        if self.policy.published_tcp.is_empty() && self.policy.published_udp.is_empty() {
            return;
        }
        let Some((protocol, src_port, dst_port, flags)) = frame::ports(ip) else {
            return;
        };
        let key = (protocol, u32::from(ip.src), src_port, dst_port);
        let opens = match protocol {
            frame::PROTO_TCP if self.policy.published_tcp.contains(&dst_port) => {
                flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            }
            frame::PROTO_UDP if self.policy.published_udp.contains(&dst_port) => true,
            _ => return,
        };
        if opens || self.flows.contains_key(&key) {
            let until = now + flow_idle(protocol);
            remember(&mut self.flows, MAX_INBOUND_FLOWS, key, until, now);
        }
    }

    fn inspect_inbound(&mut self, ip: &Ipv4<'_>, now: Instant) -> Verdict {
        let Some(resolver) = self.policy.dns else {
            return Verdict::Pass;
        };
        if !self.has_domain_rules || ip.src != resolver {
            return Verdict::Pass;
        }
        match frame::udp(ip) {
            Some((DNS_PORT, _, payload)) => self.inspect_dns(payload, now),
            _ => Verdict::Pass,
        }
    }

    fn inspect_dns(&mut self, payload: &[u8], now: Instant) -> Verdict {
        let rules = &self.policy.rules;
        let mut deny: Option<usize> = None;
        let parsed = dns::parse(payload, &mut |name| {
            let searched = deny.unwrap_or(rules.len());
            deny = rules[..searched]
                .iter()
                .position(|r| {
                    r.action == Action::Deny
                        && matches!(&r.target, Target::Domain(p) if p.matches_wire(name.wire()))
                })
                .or(deny);
        });
        if let Ok(response) = parsed {
            if response.learnable {
                self.learn(&response, now);
            }
        }
        match deny {
            Some(i) => Verdict::Drop(DropReason::DnsAnswer(i)),
            None => Verdict::Pass,
        }
    }

    fn learn(&mut self, response: &dns::Response<'_>, now: Instant) {
        let chain = response.chain();
        self.matched.clear();
        for (i, rule) in self.policy.rules.iter().enumerate() {
            let Target::Domain(p) = &rule.target else {
                continue;
            };
            let hit = match rule.action {
                Action::Allow => p.matches_wire(chain.question().wire()),
                Action::Deny => chain.names().iter().any(|n| p.matches_wire(n.wire())),
            };
            if hit {
                self.matched.push(i);
            }
        }
        if self.matched.is_empty() {
            return;
        }
        let (table, matched) = (&mut self.learned, &self.matched);
        response.addresses(&chain, |addr, ttl| {
            // RFC 2181 8: a TTL with the top bit set means zero.
            let ttl = if ttl > i32::MAX as u32 { 0 } else { ttl };
            let ttl = Duration::from_secs(u64::from(ttl)).clamp(MIN_TTL, MAX_TTL);
            let Some(expires) = now.checked_add(ttl) else {
                return;
            };
            for &rule in matched {
                table.insert(addr, rule, expires, now);
            }
        });
    }

    fn count(&mut self, verdict: Verdict, bytes: usize, outbound: bool) {
        let c = &mut self.counters;
        let one = |n: &mut u64| *n = n.saturating_add(1);
        let bytes = bytes as u64;
        match verdict {
            Verdict::Pass if outbound => {
                one(&mut c.passed_out_frames);
                c.passed_out_bytes = c.passed_out_bytes.saturating_add(bytes);
            }
            Verdict::Pass => {
                one(&mut c.passed_in_frames);
                c.passed_in_bytes = c.passed_in_bytes.saturating_add(bytes);
            }
            Verdict::Drop(DropReason::Malformed) => one(&mut c.dropped_malformed),
            Verdict::Drop(DropReason::NotIpv4) => one(&mut c.dropped_not_ipv4),
            Verdict::Drop(DropReason::Rule(i)) => one(&mut c.dropped_by_rule[i]),
            Verdict::Drop(DropReason::Builtin(i)) => one(&mut c.dropped_builtin[i]),
            Verdict::Drop(DropReason::Default) => one(&mut c.dropped_default),
            Verdict::Drop(DropReason::DnsAnswer(_)) => one(&mut c.dropped_dns_answers),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::dns::tests::{wire, Msg, EXAMPLE_RESPONSE, QNAME};
    use super::super::frame::{ETHERTYPE_ARP, ETHERTYPE_IPV4, PROTO_TCP, PROTO_UDP};
    use super::super::policy::Rule;
    use super::*;

    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
    const RESOLVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
    const MF: u16 = 0x2000;

    fn ip(a: [u8; 4]) -> Ipv4Addr {
        Ipv4Addr::from(a)
    }

    fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x52, 0x54, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 0x0f];
        f.extend(ethertype.to_be_bytes());
        f.extend(payload);
        f
    }

    /// An IPv4 frame; `frag` is the flags-and-offset field.
    fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, frag: u16, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0];
        p.extend((20 + payload.len() as u16).to_be_bytes());
        p.extend([0, 0]);
        p.extend(frag.to_be_bytes());
        p.extend([64, protocol, 0, 0]);
        p.extend(src.octets());
        p.extend(dst.octets());
        p.extend(payload);
        ethernet(ETHERTYPE_IPV4, &p)
    }

    fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, data: &[u8]) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend(sport.to_be_bytes());
        u.extend(dport.to_be_bytes());
        u.extend((8 + data.len() as u16).to_be_bytes());
        u.extend([0, 0]);
        u.extend(data);
        ipv4(src, dst, PROTO_UDP, 0, &u)
    }

    /// A TCP SYN from the guest.
    fn tcp(dst: Ipv4Addr, dport: u16) -> Vec<u8> {
        let mut t = vec![0x9c, 0x40];
        t.extend(dport.to_be_bytes());
        t.extend([0; 8]);
        t.extend([0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        ipv4(GUEST, dst, PROTO_TCP, 0, &t)
    }

    fn out_to(dst: Ipv4Addr) -> Vec<u8> {
        tcp(dst, 443)
    }

    /// A TCP segment with `flags` from `src:sport` to `dst:dport`.
    fn segment(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = sport.to_be_bytes().to_vec();
        t.extend(dport.to_be_bytes());
        t.extend([0; 8]);
        t.extend([0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        ipv4(src, dst, PROTO_TCP, 0, &t)
    }

    #[test]
    fn the_guest_answers_connections_to_published_ports_only() {
        let gateway = ip([10, 0, 2, 2]);
        let mut f = EgressFilter::new(EgressPolicy {
            published_tcp: vec![8080],
            published_udp: vec![5353],
            ..policy(&[], Action::Allow)
        });
        let t0 = Instant::now();
        let reply = segment(GUEST, 8080, gateway, 40000, TCP_SYN | TCP_ACK);
        let private = Verdict::Drop(builtin("private", "10.0.0.0/8"));
        // Nothing asked yet: the gateway is a private address like any other.
        assert_eq!(f.outbound(&reply, t0), private);
        // A SYN to an unpublished port, or an ACK without a SYN, opens nothing.
        f.inbound(&segment(gateway, 40000, GUEST, 8081, TCP_SYN), t0);
        f.inbound(&segment(gateway, 40000, GUEST, 8080, TCP_ACK), t0);
        assert_eq!(f.outbound(&reply, t0), private);
        // The peer's SYN to the published port: its answers pass, and only those.
        f.inbound(&segment(gateway, 40000, GUEST, 8080, TCP_SYN), t0);
        assert_eq!(f.outbound(&reply, t0), Verdict::Pass);
        assert_eq!(
            f.outbound(&segment(GUEST, 8080, gateway, 40001, TCP_ACK), t0),
            private
        );
        assert_eq!(
            f.outbound(&segment(GUEST, 8081, gateway, 40000, TCP_ACK), t0),
            private
        );
        assert_eq!(
            f.outbound(&segment(GUEST, 8080, ip([10, 0, 2, 9]), 40000, TCP_ACK), t0),
            private
        );
        assert_eq!(
            f.outbound(&udp(GUEST, 8080, gateway, 40000, b"x"), t0),
            private
        );
        // The peer's later segments keep it open; silence ends it.
        let later = t0 + TCP_FLOW_IDLE - Duration::from_secs(1);
        f.inbound(&segment(gateway, 40000, GUEST, 8080, TCP_ACK), later);
        assert_eq!(
            f.outbound(&reply, later + Duration::from_secs(2)),
            Verdict::Pass
        );
        assert_eq!(f.outbound(&reply, later + TCP_FLOW_IDLE), private);
        // UDP: any datagram to a published port may be answered, for a while.
        f.inbound(&udp(gateway, 50000, GUEST, 5353, b"q"), t0);
        assert_eq!(
            f.outbound(&udp(GUEST, 5353, gateway, 50000, b"a"), t0),
            Verdict::Pass
        );
        assert_eq!(
            f.outbound(&udp(GUEST, 5353, gateway, 50000, b"a"), t0 + UDP_FLOW_IDLE),
            private
        );
    }

    #[test]
    fn remembered_connections_are_capped() {
        let peer = ip([192, 0, 2, 1]);
        let mut f = EgressFilter::new(EgressPolicy {
            published_tcp: vec![80],
            ..policy(&[(Action::Deny, "0.0.0.0/0")], Action::Allow)
        });
        let t0 = Instant::now();
        for port in 0..(MAX_INBOUND_FLOWS as u16 + 10) {
            f.inbound(&segment(peer, 1000 + port, GUEST, 80, TCP_SYN), t0);
        }
        assert_eq!(f.flows.len(), MAX_INBOUND_FLOWS);
        let last = 1000 + MAX_INBOUND_FLOWS as u16 + 5;
        assert_eq!(
            f.outbound(&segment(GUEST, 80, peer, last, TCP_ACK), t0),
            Verdict::Drop(DropReason::Rule(0))
        );
        // Once the old ones expired, new ones are taken again.
        let t1 = t0 + TCP_FLOW_IDLE;
        f.inbound(&segment(peer, last, GUEST, 80, TCP_SYN), t1);
        assert_eq!(
            f.outbound(&segment(GUEST, 80, peer, last, TCP_ACK), t1),
            Verdict::Pass
        );
        assert_eq!(f.flows.len(), 1);
    }

    /// A DNS answer from the resolver to the guest.
    fn answer(msg: &[u8]) -> Vec<u8> {
        udp(RESOLVER, 53, GUEST, 40000, msg)
    }

    fn policy(rules: &[(Action, &str)], default_action: Action) -> EgressPolicy {
        let p = EgressPolicy {
            rules: rules
                .iter()
                .map(|&(action, t)| Rule {
                    action,
                    target: t.parse().unwrap(),
                })
                .collect(),
            dns: Some(RESOLVER),
            default_action,
            ..EgressPolicy::default()
        };
        p.check().unwrap();
        p
    }

    fn filter(rules: &[(Action, &str)], default_action: Action) -> EgressFilter {
        EgressFilter::new(policy(rules, default_action))
    }

    use Action::{Allow, Deny};
    use DropReason::*;
    use Verdict::{Drop, Pass};

    fn builtin(name: &str, net: &str) -> DropReason {
        let i = BUILTIN_DENY
            .iter()
            .position(|(n, c)| *n == name && c.to_string() == net)
            .unwrap();
        Builtin(i)
    }

    #[test]
    fn malformed_and_not_ipv4() {
        let mut f = filter(&[], Allow);
        let now = Instant::now();
        let good = out_to(ip([1, 1, 1, 1]));
        assert_eq!(f.outbound(&good, now), Pass);
        assert_eq!(f.outbound(&good[..13], now), Drop(Malformed));
        assert_eq!(f.outbound(&good[..14 + 19], now), Drop(Malformed));
        let mut bad = good.clone();
        bad[14] = 0x65; // version 6
        assert_eq!(f.outbound(&bad, now), Drop(Malformed));
        bad[14] = 0x44; // IHL 4
        assert_eq!(f.outbound(&bad, now), Drop(Malformed));
        bad = good.clone();
        bad[16..18].copy_from_slice(&(good.len() as u16 - 14 + 1).to_be_bytes());
        assert_eq!(f.outbound(&bad, now), Drop(Malformed), "total > frame");
        bad[16..18].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(f.outbound(&bad, now), Drop(Malformed), "total < header");
        let mut padded = good.clone();
        padded.extend([0; 20]);
        assert_eq!(f.outbound(&padded, now), Pass, "Ethernet padding is fine");

        assert_eq!(f.outbound(&ethernet(ETHERTYPE_ARP, &[0; 28]), now), Pass);
        assert_eq!(
            f.outbound(&ethernet(0x86dd, &[0x60; 40]), now),
            Drop(NotIpv4)
        );
        let mut vlan = vec![0, 5];
        vlan.extend(ETHERTYPE_IPV4.to_be_bytes());
        vlan.extend(&good[14..]);
        assert_eq!(f.outbound(&ethernet(0x8100, &vlan), now), Drop(NotIpv4));
        assert_eq!(f.outbound(&ethernet(0x0040, &[0; 64]), now), Drop(NotIpv4));

        let c = f.counters();
        assert_eq!(c.passed_out_frames, 3);
        assert_eq!(
            c.passed_out_bytes,
            (good.len() + padded.len() + 14 + 28) as u64
        );
        assert_eq!(c.dropped_malformed, 6);
        assert_eq!(c.dropped_not_ipv4, 3);
        assert_eq!(c.frames(), 12);
    }

    #[test]
    fn builtin_ranges_and_default() {
        let now = Instant::now();
        let mut f = filter(&[], Allow);
        assert_eq!(
            f.outbound(&out_to(ip([169, 254, 169, 254])), now),
            Drop(builtin("link-local and cloud metadata", "169.254.0.0/16"))
        );
        assert_eq!(
            f.outbound(&out_to(ip([10, 0, 2, 2])), now),
            Drop(builtin("private", "10.0.0.0/8"))
        );
        assert_eq!(
            f.outbound(&out_to(ip([127, 0, 0, 1])), now),
            Drop(builtin("loopback", "127.0.0.0/8"))
        );
        assert_eq!(
            f.outbound(&out_to(Ipv4Addr::BROADCAST), now),
            Drop(builtin("reserved and broadcast", "240.0.0.0/4"))
        );
        assert_eq!(f.outbound(&out_to(ip([1, 1, 1, 1])), now), Pass);
        assert_eq!(f.outbound(&out_to(ip([172, 32, 0, 1])), now), Pass);
        let c = f.counters();
        assert_eq!(c.dropped_builtin.iter().sum::<u64>(), 4);
        assert_eq!(c.dropped_builtin[1], 1);

        let mut f = filter(&[], Deny);
        assert_eq!(f.outbound(&out_to(ip([1, 1, 1, 1])), now), Drop(Default));
        assert_eq!(
            f.outbound(&out_to(ip([192, 168, 1, 1])), now),
            Drop(builtin("private", "192.168.0.0/16")),
            "a builtin range counts as itself, not as the default"
        );
        assert_eq!(f.counters().dropped_default, 1);
    }

    #[test]
    fn user_rules_override_builtin_ranges() {
        let now = Instant::now();
        let mut f = filter(&[(Allow, "10.0.2.2")], Deny);
        assert_eq!(f.outbound(&out_to(ip([10, 0, 2, 2])), now), Pass);
        assert_eq!(
            f.outbound(&out_to(ip([10, 0, 2, 5])), now),
            Drop(builtin("private", "10.0.0.0/8"))
        );
        // A user deny covering a builtin range is counted as the user's rule.
        let mut f = filter(&[(Deny, "169.254.169.254")], Allow);
        assert_eq!(
            f.outbound(&out_to(ip([169, 254, 169, 254])), now),
            Drop(Rule(0))
        );
        assert_eq!(f.counters().dropped_by_rule, [1]);
        // A broad allow lifts every builtin range: any user rule covering D decides.
        let mut f = filter(&[(Allow, "0.0.0.0/0")], Deny);
        assert_eq!(f.outbound(&out_to(ip([169, 254, 169, 254])), now), Pass);
    }

    #[test]
    fn most_specific_wins_both_ways() {
        let now = Instant::now();
        for rules in [
            [(Deny, "10.0.0.0/8"), (Allow, "10.1.0.0/16")],
            [(Allow, "10.1.0.0/16"), (Deny, "10.0.0.0/8")],
        ] {
            let mut f = filter(&rules, Allow);
            let deny = rules.iter().position(|r| r.0 == Deny).unwrap();
            assert_eq!(f.outbound(&out_to(ip([10, 1, 2, 3])), now), Pass);
            assert_eq!(
                f.outbound(&out_to(ip([10, 2, 0, 1])), now),
                Drop(Rule(deny))
            );
        }
        for rules in [
            [(Allow, "0.0.0.0/0"), (Deny, "1.2.3.0/24")],
            [(Deny, "1.2.3.0/24"), (Allow, "0.0.0.0/0")],
        ] {
            let mut f = filter(&rules, Deny);
            let deny = rules.iter().position(|r| r.0 == Deny).unwrap();
            assert_eq!(f.outbound(&out_to(ip([1, 2, 3, 4])), now), Drop(Rule(deny)));
            assert_eq!(f.outbound(&out_to(ip([1, 2, 4, 4])), now), Pass);
        }
    }

    #[test]
    fn tie_goes_to_deny() {
        let now = Instant::now();
        for rules in [
            [(Allow, "1.2.3.0/24"), (Deny, "1.2.3.0/24")],
            [(Deny, "1.2.3.0/24"), (Allow, "1.2.3.0/24")],
        ] {
            let deny = rules.iter().position(|r| r.0 == Deny).unwrap();
            let mut f = filter(&rules, Allow);
            assert_eq!(f.outbound(&out_to(ip([1, 2, 3, 9])), now), Drop(Rule(deny)));
        }
        // Equal denies: the first in the policy is counted.
        let mut f = filter(&[(Deny, "1.2.3.0/25"), (Deny, "1.2.3.0/25")], Allow);
        assert_eq!(f.outbound(&out_to(ip([1, 2, 3, 9])), now), Drop(Rule(0)));
        assert_eq!(f.counters().dropped_by_rule, [1, 0]);
    }

    #[test]
    fn dns_exemption() {
        let now = Instant::now();
        let query = Msg::response("example.com", 0).0;
        // The resolver is in 10.0.0.0/8, and a user rule denies it outright.
        let mut f = filter(&[(Deny, "10.0.2.3")], Allow);
        let to_resolver = |port| udp(GUEST, 40000, RESOLVER, port, &query);
        assert_eq!(f.outbound(&to_resolver(53), now), Pass);
        assert_eq!(f.outbound(&tcp(RESOLVER, 53), now), Pass);

        // Not to port 54, nor to another address on 53.
        assert_eq!(f.outbound(&to_resolver(54), now), Drop(Rule(0)));
        assert_eq!(f.outbound(&tcp(RESOLVER, 54), now), Drop(Rule(0)));
        assert_eq!(
            f.outbound(&udp(GUEST, 40000, ip([10, 0, 2, 4]), 53, &query), now),
            Drop(builtin("private", "10.0.0.0/8"))
        );
        assert_eq!(
            f.outbound(&udp(GUEST, 40000, ip([10, 0, 2, 4]), 53, &query), now),
            Drop(builtin("private", "10.0.0.0/8"))
        );
        // Not to a fragment: the first (more fragments) nor a later one (offset).
        let whole = to_resolver(53);
        let first = ipv4(GUEST, RESOLVER, PROTO_UDP, MF, &whole[34..34 + 16]);
        assert_eq!(f.outbound(&first, now), Drop(Rule(0)));
        let later = ipv4(GUEST, RESOLVER, PROTO_UDP, 2, &whole[34 + 16..]);
        assert_eq!(f.outbound(&later, now), Drop(Rule(0)));
        // Not without a whole transport header.
        let short = ipv4(GUEST, RESOLVER, PROTO_UDP, 0, &whole[34..34 + 7]);
        assert_eq!(f.outbound(&short, now), Drop(Rule(0)));
        let mut bad_offset = tcp(RESOLVER, 53);
        bad_offset[34 + 12] = 0x40; // data offset 16 bytes
        assert_eq!(f.outbound(&bad_offset, now), Drop(Rule(0)));
        bad_offset[34 + 12] = 0x60; // 24 bytes, past the packet
        assert_eq!(f.outbound(&bad_offset, now), Drop(Rule(0)));
        // Not for another protocol to the resolver.
        let icmp = ipv4(GUEST, RESOLVER, 1, 0, &[8, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(f.outbound(&icmp, now), Drop(Rule(0)));

        // Without a resolver in the policy there is no exemption.
        let mut f = EgressFilter::new(EgressPolicy::default());
        assert_eq!(
            f.outbound(&to_resolver(53), now),
            Drop(builtin("private", "10.0.0.0/8"))
        );
    }

    #[test]
    fn fragments_are_judged_by_their_destination() {
        let now = Instant::now();
        let mut f = filter(&[(Allow, "10.0.2.2")], Allow);
        let frag = ipv4(GUEST, ip([10, 0, 2, 9]), PROTO_UDP, 100, &[0xab; 8]);
        assert_eq!(
            f.outbound(&frag, now),
            Drop(builtin("private", "10.0.0.0/8"))
        );
        let frag = ipv4(GUEST, ip([10, 0, 2, 2]), PROTO_UDP, MF | 100, &[0xab; 3]);
        assert_eq!(f.outbound(&frag, now), Pass);
    }

    #[test]
    fn learns_from_a_resolver_answer_until_the_ttl() {
        let t0 = Instant::now();
        let mut f = filter(&[(Allow, "*.example.com")], Deny);
        let cdn = out_to(ip([93, 184, 216, 34]));
        assert_eq!(f.outbound(&cdn, t0), Drop(Default));
        assert_eq!(f.inbound(&answer(EXAMPLE_RESPONSE), t0), Pass);
        assert_eq!(f.outbound(&cdn, t0), Pass, "learned through the CNAME");
        assert_eq!(
            f.outbound(&out_to(ip([6, 6, 6, 6])), t0),
            Drop(Default),
            "an A record for another name teaches nothing"
        );
        assert_eq!(
            f.learned().collect::<Vec<_>>(),
            [Learned {
                addr: ip([93, 184, 216, 34]),
                rule: 0,
                expires: t0 + Duration::from_secs(60),
            }]
        );
        let t1 = t0 + Duration::from_secs(59);
        assert_eq!(f.outbound(&cdn, t1), Pass);
        let t2 = t0 + Duration::from_secs(60);
        let new_connection = segment(GUEST, 40001, ip([93, 184, 216, 34]), 443, TCP_SYN);
        assert_eq!(f.outbound(&new_connection, t2), Drop(Default), "expired");
        assert_eq!(
            f.outbound(&cdn, t2),
            Pass,
            "the connection it let out goes on"
        );
        let c = f.counters();
        assert_eq!(c.passed_in_frames, 1);
        assert_eq!(c.passed_in_bytes, answer(EXAMPLE_RESPONSE).len() as u64);
        assert_eq!(c.frames(), 7);

        // Exact names: the apex does not match the wildcard.
        let mut f = filter(&[(Allow, "example.com")], Deny);
        f.inbound(&answer(EXAMPLE_RESPONSE), t0);
        assert_eq!(f.outbound(&cdn, t0), Drop(Default));
        let mut f = filter(&[(Allow, "WWW.Example.com.")], Deny);
        f.inbound(&answer(EXAMPLE_RESPONSE), t0);
        assert_eq!(f.outbound(&cdn, t0), Pass);
    }

    #[test]
    fn a_connection_a_learned_address_let_out_outlives_the_ttl_while_active() {
        let t0 = Instant::now();
        let cdn_ip = ip([93, 184, 216, 34]);
        let mut f = filter(&[(Allow, "*.example.com"), (Deny, "0.0.0.0/0")], Allow);
        let deny_all = Drop(Rule(1));
        let connection = segment(GUEST, 40000, cdn_ip, 443, TCP_SYN);
        let data = segment(GUEST, 40000, cdn_ip, 443, TCP_ACK);
        let datagram = udp(GUEST, 5000, cdn_ip, 443, b"quic");
        assert_eq!(f.outbound(&connection, t0), deny_all, "nothing learned yet");
        f.inbound(&answer(EXAMPLE_RESPONSE), t0);
        assert_eq!(f.outbound(&connection, t0), Pass);
        assert_eq!(f.outbound(&datagram, t0), Pass);
        // Long after the TTL (60 s), the connection goes on as long as the guest keeps sending.
        let mut t = t0;
        for _ in 0..10 {
            t += TCP_FLOW_IDLE - Duration::from_secs(1);
            assert_eq!(f.outbound(&data, t), Pass);
        }
        // Idle for too long: gone, like the UDP exchange that went quiet long ago.
        let t = t + TCP_FLOW_IDLE;
        assert_eq!(f.outbound(&data, t), deny_all);
        assert_eq!(f.outbound(&datagram, t), deny_all);
        // Only the exact flow: other ports, other destinations and protocols are not.
        f.inbound(&answer(EXAMPLE_RESPONSE), t);
        assert_eq!(f.outbound(&connection, t), Pass);
        let later = t + Duration::from_secs(61);
        assert_eq!(f.outbound(&data, later), Pass);
        for other in [
            segment(GUEST, 40001, cdn_ip, 443, TCP_ACK),
            segment(GUEST, 40000, cdn_ip, 80, TCP_ACK),
            segment(GUEST, 40000, ip([93, 184, 216, 35]), 443, TCP_ACK),
            udp(GUEST, 40000, cdn_ip, 443, b"x"),
        ] {
            assert_eq!(f.outbound(&other, later), deny_all);
        }
        // A network rule's pass is not remembered: nothing it allows ever expires.
        let mut g = filter(&[(Allow, "93.184.216.0/24")], Deny);
        assert_eq!(g.outbound(&connection, t0), Pass);
        assert!(g.outbound_flows.is_empty());
    }

    #[test]
    fn remembered_outbound_connections_are_capped() {
        let t0 = Instant::now();
        let cdn_ip = ip([93, 184, 216, 34]);
        let mut f = filter(&[(Allow, "*.example.com")], Deny);
        f.inbound(&answer(EXAMPLE_RESPONSE), t0);
        for port in 0..(MAX_OUTBOUND_FLOWS as u16 + 10) {
            let syn = segment(GUEST, 1000 + port, cdn_ip, 443, TCP_SYN);
            assert_eq!(f.outbound(&syn, t0), Pass, "the address still counts");
        }
        assert_eq!(f.outbound_flows.len(), MAX_OUTBOUND_FLOWS);
        let after_ttl = t0 + Duration::from_secs(60);
        let first = segment(GUEST, 1000, cdn_ip, 443, TCP_ACK);
        let unremembered = segment(
            GUEST,
            1000 + MAX_OUTBOUND_FLOWS as u16 + 5,
            cdn_ip,
            443,
            TCP_ACK,
        );
        assert_eq!(f.outbound(&first, after_ttl), Pass);
        assert_eq!(f.outbound(&unremembered, after_ttl), Drop(Default));
    }

    #[test]
    fn ttl_is_clamped() {
        let t0 = Instant::now();
        let mut f = filter(&[(Allow, "a.test"), (Allow, "b.test")], Deny);
        let zero = Msg::response("a.test", 1).a(&QNAME, 0, [1, 1, 1, 1]);
        let day = Msg::response("b.test", 1).a(&QNAME, 86_400, [2, 2, 2, 2]);
        let negative = Msg::response("a.test", 1).a(&QNAME, 0x8000_0000, [3, 3, 3, 3]);
        for m in [zero, day, negative] {
            assert_eq!(f.inbound(&answer(&m.0), t0), Pass);
        }
        let expiry: Vec<_> = f.learned().map(|l| (l.addr, l.expires - t0)).collect();
        assert_eq!(
            expiry,
            [
                (ip([1, 1, 1, 1]), MIN_TTL),
                (ip([2, 2, 2, 2]), MAX_TTL),
                (ip([3, 3, 3, 3]), MIN_TTL)
            ]
        );
    }

    #[test]
    fn learning_again_never_shortens() {
        let t0 = Instant::now();
        let mut f = filter(&[(Allow, "*.test")], Deny);
        let long = Msg::response("a.test", 1).a(&QNAME, 3600, [1, 1, 1, 1]);
        let short = Msg::response("b.test", 1).a(&QNAME, 1, [1, 1, 1, 1]);
        f.inbound(&answer(&long.0), t0);
        f.inbound(&answer(&short.0), t0);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(f.outbound(&out_to(ip([1, 1, 1, 1])), later), Pass);
        assert_eq!(f.learned_len(), 1);
    }

    #[test]
    fn cname_attribution() {
        let now = Instant::now();
        // The question is allowed; the chain leads elsewhere: allowed.
        let mut f = filter(&[(Allow, "*.allowed.test")], Deny);
        let m = Msg::response("www.allowed.test", 3)
            .cname(&QNAME, 300, &wire("edge.cdn.test"))
            .cname(&wire("edge.cdn.test"), 300, &wire("e1.cdn.test"))
            .a(&wire("e1.cdn.test"), 300, [5, 5, 5, 5]);
        assert_eq!(f.inbound(&answer(&m.0), now), Pass);
        assert_eq!(f.outbound(&out_to(ip([5, 5, 5, 5])), now), Pass);

        // A name the guest asked that CNAMEs into the allowed domain: its server chose the
        // address, so nothing is learned.
        let mut f = filter(&[(Allow, "*.allowed.test")], Deny);
        let m = Msg::response("x.attacker.test", 2)
            .cname(&QNAME, 300, &wire("www.allowed.test"))
            .a(&wire("www.allowed.test"), 300, [6, 6, 6, 6]);
        assert_eq!(f.inbound(&answer(&m.0), now), Pass);
        assert_eq!(f.outbound(&out_to(ip([6, 6, 6, 6])), now), Drop(Default));
        assert_eq!(f.learned_len(), 0);

        // A deny rule matches anywhere in the chain: dropped, and the address learned as denied
        // (it ties with the allowed question's /32, and deny wins the tie).
        let mut f = filter(
            &[(Allow, "*.allowed.test"), (Deny, "*.tracker.test")],
            Allow,
        );
        let m = Msg::response("www.allowed.test", 2)
            .cname(&QNAME, 300, &wire("x.tracker.test"))
            .a(&wire("x.tracker.test"), 300, [7, 7, 7, 7]);
        assert_eq!(f.inbound(&answer(&m.0), now), Drop(DnsAnswer(1)));
        assert_eq!(f.outbound(&out_to(ip([7, 7, 7, 7])), now), Drop(Rule(1)));
        assert_eq!(f.learned_len(), 2);
        let c = f.counters();
        assert_eq!(c.dropped_dns_answers, 1);
        assert_eq!(c.dropped_by_rule, [0, 1]);
    }

    #[test]
    fn learned_and_network_rules_compete_by_specificity() {
        let now = Instant::now();
        let learn = |f: &mut EgressFilter, name: &str| {
            let m = Msg::response(name, 1).a(&QNAME, 300, [9, 9, 9, 9]);
            f.inbound(&answer(&m.0), now);
        };
        let nine = out_to(ip([9, 9, 9, 9]));
        // A learned allow (/32) beats a network deny (/24).
        let mut f = filter(&[(Deny, "9.9.9.0/24"), (Allow, "a.test")], Allow);
        learn(&mut f, "a.test");
        assert_eq!(f.outbound(&nine, now), Pass);
        // A learned deny beats a network allow (/24).
        let mut f = filter(&[(Allow, "9.9.9.0/24"), (Deny, "a.test")], Allow);
        learn(&mut f, "a.test");
        assert_eq!(f.outbound(&nine, now), Drop(Rule(1)));
        // A /32 network rule ties with a learned address: deny wins either way.
        let mut f = filter(&[(Allow, "9.9.9.9"), (Deny, "a.test")], Allow);
        learn(&mut f, "a.test");
        assert_eq!(f.outbound(&nine, now), Drop(Rule(1)));
        let mut f = filter(&[(Allow, "a.test"), (Deny, "9.9.9.9")], Allow);
        learn(&mut f, "a.test");
        assert_eq!(f.outbound(&nine, now), Drop(Rule(1)));
        // A learned allow lifts a builtin range, like any user rule.
        let mut f = filter(&[(Allow, "intranet.test")], Deny);
        let m = Msg::response("intranet.test", 1).a(&QNAME, 300, [10, 9, 9, 9]);
        f.inbound(&answer(&m.0), now);
        assert_eq!(f.outbound(&out_to(ip([10, 9, 9, 9])), now), Pass);
    }

    #[test]
    fn deny_domain_answers_are_dropped() {
        let now = Instant::now();
        let mut f = filter(&[(Allow, "*.test"), (Deny, "bad.test")], Allow);
        let m = Msg::response("BAD.test.", 1).a(&QNAME, 300, [8, 8, 4, 4]);
        assert_eq!(f.inbound(&answer(&m.0), now), Drop(DnsAnswer(1)));
        // Also when the answers after the question are malformed, or the name does not exist.
        let mut broken = m.0.clone();
        broken.truncate(broken.len() - 1);
        assert_eq!(f.inbound(&answer(&broken), now), Drop(DnsAnswer(1)));
        let mut nx = Msg::response("bad.test", 0).0;
        nx[3] |= 3;
        assert_eq!(f.inbound(&answer(&nx), now), Drop(DnsAnswer(1)));
        // Other names pass.
        let ok = Msg::response("good.test", 1).a(&QNAME, 300, [8, 8, 8, 8]);
        assert_eq!(f.inbound(&answer(&ok.0), now), Pass);
        let c = f.counters();
        assert_eq!(c.dropped_dns_answers, 3);
        assert_eq!(c.passed_in_frames, 1);
        assert_eq!(
            c.dropped_by_rule,
            [0, 0],
            "DNS drops have their own counter"
        );
    }

    #[test]
    fn hostile_answers_teach_nothing_and_end() {
        let now = Instant::now();
        let mut f = filter(&[(Allow, "a.test")], Deny);
        // Owner: a label then a pointer back to it (a loop).
        let mut m = Msg::response("a.test", 1);
        let at = m.0.len() as u8;
        m = m.a(&[1, b'a', 0xc0, at], 300, [1, 2, 3, 4]);
        assert_eq!(f.inbound(&answer(&m.0), now), Pass);
        // Owner: a forward pointer to a copy of the question name placed after the record.
        let mut m = Msg::response("a.test", 1);
        let at = m.0.len() as u8;
        m = m.a(&[0xc0, at + 16], 300, [1, 2, 3, 4]);
        m.0.extend(wire("a.test"));
        assert_eq!(f.inbound(&answer(&m.0), now), Pass);
        // A good record followed by a broken one: the whole message teaches nothing.
        let m = Msg::response("a.test", 2)
            .a(&QNAME, 300, [1, 2, 3, 4])
            .record(&QNAME, 1, 300, &[1, 2, 3]);
        assert_eq!(f.inbound(&answer(&m.0), now), Pass);
        assert_eq!(f.learned_len(), 0);
        assert_eq!(f.outbound(&out_to(ip([1, 2, 3, 4])), now), Drop(Default));

        // The same good answer from elsewhere, from another port, fragmented or over TCP.
        let good = Msg::response("a.test", 1).a(&QNAME, 300, [1, 2, 3, 4]).0;
        let from_elsewhere = udp(ip([8, 8, 8, 8]), 53, GUEST, 40000, &good);
        let from_port = udp(RESOLVER, 5353, GUEST, 40000, &good);
        let mut fragmented = answer(&good);
        fragmented[20] = 0x20; // more fragments
        let mut over_tcp = vec![0, 53, 0x9c, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x18, 1, 0];
        over_tcp.extend([0; 4]);
        over_tcp.extend((good.len() as u16).to_be_bytes());
        over_tcp.extend(&good);
        let over_tcp = ipv4(RESOLVER, GUEST, PROTO_TCP, 0, &over_tcp);
        for frame in [from_elsewhere, from_port, fragmented, over_tcp] {
            assert_eq!(f.inbound(&frame, now), Pass);
        }
        assert_eq!(f.learned_len(), 0);
        // And the answer itself does teach.
        assert_eq!(f.inbound(&answer(&good), now), Pass);
        assert_eq!(f.outbound(&out_to(ip([1, 2, 3, 4])), now), Pass);
        assert_eq!(f.counters().passed_in_frames, 8);
    }

    #[test]
    fn learned_table_is_capped_oldest_first() {
        let t0 = Instant::now();
        let mut f = filter(&[(Allow, "*.test")], Deny);
        let addr = |n: usize| ip([11, 0, (n >> 8) as u8, n as u8]);
        let total = MAX_LEARNED + 64;
        for batch in 0..total / 64 {
            let mut m = Msg::response(&format!("b{batch}.test"), 64);
            for i in 0..64 {
                m = m.a(&QNAME, 3600, addr(batch * 64 + i).octets());
            }
            assert_eq!(f.inbound(&answer(&m.0), t0), Pass);
            assert!(f.learned_len() <= MAX_LEARNED);
        }
        assert_eq!(f.learned_len(), MAX_LEARNED);
        for n in 0..64 {
            assert_eq!(f.outbound(&out_to(addr(n)), t0), Drop(Default), "{n}");
        }
        for n in [64, 1000, total - 1] {
            assert_eq!(f.outbound(&out_to(addr(n)), t0), Pass, "{n}");
        }
        // Learning an address again makes it the newest: the next eviction spares it.
        let refresh = Msg::response("again.test", 1).a(&QNAME, 3600, addr(64).octets());
        f.inbound(&answer(&refresh.0), t0);
        let one_more = Msg::response("new.test", 1).a(&QNAME, 3600, [12, 0, 0, 1]);
        f.inbound(&answer(&one_more.0), t0);
        assert_eq!(f.outbound(&out_to(addr(64)), t0), Pass);
        assert_eq!(f.outbound(&out_to(addr(65)), t0), Drop(Default));
        assert_eq!(f.learned_len(), MAX_LEARNED);

        // Expired entries are pushed out before live ones.
        let mut f = filter(&[(Allow, "*.test")], Deny);
        let short = Msg::response("short.test", 1).a(&QNAME, 1, [13, 0, 0, 1]);
        let long = Msg::response("long.test", 1).a(&QNAME, 3600, [13, 0, 0, 2]);
        f.inbound(&answer(&short.0), t0);
        f.inbound(&answer(&long.0), t0);
        let later = Msg::response("later.test", 1).a(&QNAME, 3600, [13, 0, 0, 3]);
        f.inbound(&answer(&later.0), t0 + Duration::from_secs(2));
        let left: Vec<_> = f.learned().map(|l| l.addr).collect();
        assert_eq!(left, [ip([13, 0, 0, 2]), ip([13, 0, 0, 3])]);
    }

    #[test]
    fn no_domain_rules_no_inspection() {
        let now = Instant::now();
        let mut f = filter(&[(Allow, "1.2.3.4")], Deny);
        let m = Msg::response("a.test", 1).a(&QNAME, 300, [1, 2, 3, 5]);
        assert_eq!(f.inbound(&answer(&m.0), now), Pass);
        assert_eq!(f.learned_len(), 0);
        // Inbound garbage passes and is counted.
        assert_eq!(f.inbound(&[0; 3], now), Pass);
        assert_eq!(f.counters().passed_in_frames, 2);
    }
}
