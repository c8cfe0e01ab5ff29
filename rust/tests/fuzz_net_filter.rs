//! Fuzz target `net_filter`: the egress filter of the network card, on a policy and a stream of
//! frames both taken from the input.
//!
//! The input starts with a policy (up to eight network or domain rules, allow or deny, from
//! tables of interesting networks and names or raw; a resolver or none; a default action),
//! then a sequence of events (see [`Event`]): frames the guest sends, built from fields (any
//! destination, protocol, port, fragment bits, transport header length, one header field
//! corrupted) or raw; DNS answers from the resolver (or from elsewhere), built from records
//! (A, CNAME, other types, hostile compression pointers), in bulk (up to 64 addresses), or raw
//! payloads; raw frames for the guest; and the clock jumping forward.
//!
//! After every frame: the filter must not panic; the counters must have grown by exactly one
//! frame, in the counter the verdict names (and its bytes for a pass); the learned table must
//! stay within [`MAX_LEARNED`]. Every outbound verdict must equal what a naive reference of the
//! policy decides from the frame and the learned addresses, and a frame to a destination in a
//! [`BUILTIN_DENY`] range may pass only through the DNS exemption, a user allow rule or a learned
//! allowed domain. For answers built from records, the verdict (dropped exactly when a name in
//! it matches a deny rule) and what is learned (the question's chain, per matching rule, for at
//! least the clamped TTL; nothing from answers that may not teach) are checked against a
//! reference too. Learned addresses must come from bytes the resolver sent, for domain rules.
//!
//! The seed corpus in `rust/fuzz/corpus/net_filter/` is written by
//! `SUPERMACHINE_FUZZ_WRITE_SEEDS=1 cargo test --test fuzz_net_filter seed_corpus`.

// The shared driver has an unneeded `mut` (reported upstream); keep -D warnings clean here.
#[allow(unused_mut)]
mod fuzz_support;

use fuzz_support::Input;

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use supermachine_core::net::{
    Action, Cidr, DropReason, EgressFilter, EgressPolicy, FilterCounters, Learned, Rule, Target,
    Verdict, BUILTIN_DENY, MAX_LEARNED, MAX_OUTBOUND_FLOWS, MAX_TTL, MIN_TTL, TCP_FLOW_IDLE,
    UDP_FLOW_IDLE,
};

const MAX_EVENTS: usize = 256;
const MAX_RULES: usize = 8;
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const RESOLVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
const MF: u16 = 0x2000;
const UDP: u8 = 17;
const TCP: u8 = 6;

/// Destinations and answer addresses: every builtin range, the guest's gateway and resolver,
/// ordinary addresses, and the edges.
const ADDRS: [[u8; 4]; 20] = [
    [10, 0, 2, 2],
    [10, 0, 2, 3],
    [169, 254, 169, 254],
    [127, 0, 0, 1],
    [192, 168, 1, 1],
    [172, 16, 0, 1],
    [100, 64, 0, 1],
    [224, 0, 0, 251],
    [255, 255, 255, 255],
    [0, 0, 0, 0],
    [1, 1, 1, 1],
    [9, 9, 9, 9],
    [9, 9, 9, 10],
    [93, 184, 216, 34],
    [198, 18, 0, 1],
    [192, 0, 0, 170],
    [8, 8, 8, 8],
    [240, 0, 0, 1],
    [10, 9, 9, 9],
    [172, 31, 255, 255],
];

const NETS: [&str; 14] = [
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.0.2.2",
    "10.0.2.0/24",
    "9.9.9.0/24",
    "9.9.9.9",
    "169.254.169.254",
    "169.254.0.0/16",
    "1.0.0.0/8",
    "93.184.216.34",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "8.8.8.8/31",
    "128.0.0.0/1",
];

const DOMAINS: [&str; 9] = [
    "example.com",
    "*.example.com",
    "tracker.test",
    "*.tracker.test",
    "intranet.test",
    "*.test",
    "cdn.net",
    "a.test",
    "*.cdn.net",
];

/// Names in answers (any case, a trailing dot now and then).
const NAMES: [&str; 12] = [
    "example.com",
    "www.example.com",
    "a.b.Example.COM",
    "tracker.test",
    "x.tracker.test.",
    "intranet.test",
    "cdn.net",
    "edge.cdn.net",
    "a.test",
    "b.test",
    "other.org",
    "www.example.com.evil",
];

const TTLS: [u32; 7] = [0, 1, 2, 60, 3600, 86_400, 0x8000_0000];

/// Addresses from the table, for this target's inputs.
trait PickAddr {
    /// An address from [`ADDRS`], or raw when the selector is past the table.
    fn pick_addr(&mut self) -> Ipv4Addr;
}

impl PickAddr for Input<'_> {
    fn pick_addr(&mut self) -> Ipv4Addr {
        let sel = usize::from(self.u8());
        Ipv4Addr::from(if sel < 0xf0 {
            ADDRS[sel % ADDRS.len()]
        } else {
            self.addr()
        })
    }
}

/// Event kinds, the first byte of each event.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
enum Event {
    /// `dst`, `protocol`, `port`, `fragment`, `transport length`, `corruption` (+ its bytes).
    Out = 0,
    /// `length / 2`, then the frame.
    OutRaw = 1,
    /// `source`, `question`, `flags`, `count`, then per record `kind`, `owner`, `ttl`, `data`.
    Answer = 2,
    /// `source`, `question`, `count`, `ttl`, then 4 bytes: base address (records base + i).
    Bulk = 3,
    /// `source`, `length / 2`, then the DNS payload.
    AnswerRaw = 4,
    /// `length / 2`, then a frame for the guest.
    InRaw = 5,
    /// `seconds` (times 60 when the top bit is set): the clock moves on.
    Time = 6,
}

const EVENTS: u8 = 7;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x52, 0x54, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 0x0f];
    f.extend(ethertype.to_be_bytes());
    f.extend(payload);
    f
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0];
    p.extend((20 + l4.len() as u16).to_be_bytes());
    p.extend([0, 0]);
    p.extend(frag.to_be_bytes());
    p.extend([64, protocol, 0, 0]);
    p.extend(src.octets());
    p.extend(dst.octets());
    p.extend(l4);
    ethernet(0x0800, &p)
}

fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, frag: u16, data: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend(sport.to_be_bytes());
    u.extend(dport.to_be_bytes());
    u.extend((8 + data.len() as u16).to_be_bytes());
    u.extend([0, 0]);
    u.extend(data);
    ipv4(src, dst, UDP, frag, &u)
}

fn wire(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend(label.as_bytes());
    }
    out.push(0);
    out
}

fn norm(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Naive domain matching on dotted names.
fn name_matches(pattern: &str, name: &str) -> bool {
    let name = norm(name);
    match pattern.strip_prefix("*.") {
        Some(base) => name.len() > base.len() + 1 && name.ends_with(&format!(".{base}")),
        None => name == pattern,
    }
}

fn contains(c: &Cidr, ip: Ipv4Addr) -> bool {
    let prefix = u32::from(c.prefix.min(32));
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    u32::from(ip) & mask == u32::from(c.addr) & mask
}

fn policy_from(input: &mut Input) -> EgressPolicy {
    let n = usize::from(input.u8()) % (MAX_RULES + 1);
    let mut rules = Vec::new();
    for _ in 0..n {
        let sel = input.u8();
        let action = if sel & 1 != 0 {
            Action::Deny
        } else {
            Action::Allow
        };
        let index = usize::from(sel >> 2);
        let target = if sel & 2 != 0 {
            Target::Domain(DOMAINS[index % DOMAINS.len()].parse().unwrap())
        } else if index == 63 {
            // Raw, with prefixes past 32 too: a policy that skipped check() must not break it.
            Target::Net(Cidr {
                addr: Ipv4Addr::from(input.addr()),
                prefix: input.u8() % 40,
            })
        } else {
            Target::Net(NETS[index % NETS.len()].parse().unwrap())
        };
        rules.push(Rule { action, target });
    }
    let dns = match input.u8() % 4 {
        1 => None,
        2 => Some(input.pick_addr()),
        _ => Some(RESOLVER),
    };
    let default_action = if input.u8() & 1 != 0 {
        Action::Deny
    } else {
        Action::Allow
    };
    EgressPolicy {
        rules,
        dns,
        default_action,
        ..EgressPolicy::default()
    }
}

/// What the reference sees in an outbound frame.
struct Parsed {
    dst: Ipv4Addr,
    exempt: bool,
    /// Protocol, source and destination port of an unfragmented UDP or TCP packet whose
    /// transport header is whole.
    flow: Option<(u8, u16, u16)>,
}

/// A remembered outbound flow: protocol, destination address and port, source port.
type FlowKey = (u8, u32, u16, u16);

/// The reference parse: `Err` is the drop reason for frames that never reach the rules,
/// `Ok(None)` an ARP frame.
fn reference_parse(policy: &EgressPolicy, f: &[u8]) -> Result<Option<Parsed>, DropReason> {
    if f.len() < 14 {
        return Err(DropReason::Malformed);
    }
    match be16(f, 12) {
        0x0806 => return Ok(None),
        0x0800 => {}
        _ => return Err(DropReason::NotIpv4),
    }
    let ip = &f[14..];
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return Err(DropReason::Malformed);
    }
    let ihl = usize::from(ip[0] & 15) * 4;
    let total = usize::from(be16(ip, 2));
    if ihl < 20 || total < ihl || total > ip.len() {
        return Err(DropReason::Malformed);
    }
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let unfragmented = be16(ip, 6) & 0x3fff == 0;
    let l4 = &ip[ihl..total];
    let header_whole = match ip[9] {
        UDP => l4.len() >= 8,
        TCP => l4.len() >= 20 && (20..=l4.len()).contains(&(usize::from(l4[12] >> 4) * 4)),
        _ => false,
    };
    let exempt = policy.dns == Some(dst) && unfragmented && header_whole && be16(l4, 2) == 53;
    let flow = (unfragmented && header_whole).then(|| (ip[9], be16(l4, 0), be16(l4, 2)));
    Ok(Some(Parsed { dst, exempt, flow }))
}

/// The reference decision: every user rule that covers `dst` (a live learned address counts as
/// a /32 of its rule), the longest prefix among them, deny on a tie (the lowest index).
fn reference_rules(
    policy: &EgressPolicy,
    learned: &[Learned],
    dst: Ipv4Addr,
    now: Instant,
) -> Option<(Action, usize)> {
    let mut covering: Vec<(u8, Action, usize)> = Vec::new();
    for (i, r) in policy.rules.iter().enumerate() {
        if let Target::Net(c) = &r.target {
            if contains(c, dst) {
                covering.push((c.prefix.min(32), r.action, i));
            }
        }
    }
    for l in learned {
        if l.addr == dst && now < l.expires {
            covering.push((32, policy.rules[l.rule].action, l.rule));
        }
    }
    let best = covering.iter().map(|c| c.0).max()?;
    let top = covering.iter().filter(|c| c.0 == best);
    match top
        .clone()
        .filter(|c| c.1 == Action::Deny)
        .map(|c| c.2)
        .min()
    {
        Some(i) => Some((Action::Deny, i)),
        None => top.map(|c| (Action::Allow, c.2)).next(),
    }
}

fn reference_outbound(
    policy: &EgressPolicy,
    learned: &[Learned],
    f: &[u8],
    now: Instant,
) -> Verdict {
    let p = match reference_parse(policy, f) {
        Err(reason) => return Verdict::Drop(reason),
        Ok(None) => return Verdict::Pass,
        Ok(Some(p)) => p,
    };
    if p.exempt {
        return Verdict::Pass;
    }
    match reference_rules(policy, learned, p.dst, now) {
        Some((Action::Allow, _)) => Verdict::Pass,
        Some((Action::Deny, i)) => Verdict::Drop(DropReason::Rule(i)),
        None => match BUILTIN_DENY.iter().position(|(_, c)| contains(c, p.dst)) {
            Some(i) => Verdict::Drop(DropReason::Builtin(i)),
            None if policy.default_action == Action::Deny => Verdict::Drop(DropReason::Default),
            None => Verdict::Pass,
        },
    }
}

/// Whether live learned addresses let `dst` out: one of an allow rule and none of a deny rule.
fn learned_allows(policy: &EgressPolicy, learned: &[Learned], dst: Ipv4Addr, now: Instant) -> bool {
    let live: Vec<Action> = learned
        .iter()
        .filter(|l| l.addr == dst && now < l.expires)
        .map(|l| policy.rules[l.rule].action)
        .collect();
    live.contains(&Action::Allow) && !live.contains(&Action::Deny)
}

/// The reference of remembered outbound flows: a flow a learned address let out goes on while
/// active, whatever the learned addresses say later.
#[derive(Default)]
struct ReferenceFlows(HashMap<FlowKey, Instant>);

impl ReferenceFlows {
    fn idle(protocol: u8) -> Duration {
        if protocol == TCP {
            TCP_FLOW_IDLE
        } else {
            UDP_FLOW_IDLE
        }
    }

    /// The verdict with the flows applied to `rules_verdict` (the reference without them).
    fn decide(
        &mut self,
        policy: &EgressPolicy,
        learned: &[Learned],
        parsed: &Parsed,
        rules_verdict: Verdict,
        now: Instant,
    ) -> Verdict {
        let Some((protocol, sport, dport)) = parsed.flow else {
            return rules_verdict;
        };
        if parsed.exempt {
            return rules_verdict;
        }
        let key = (protocol, u32::from(parsed.dst), dport, sport);
        let until = now + Self::idle(protocol);
        if let Some(known) = self.0.get_mut(&key) {
            if now < *known {
                *known = until;
                return Verdict::Pass;
            }
        }
        if rules_verdict == Verdict::Pass && learned_allows(policy, learned, parsed.dst, now) {
            if let Some(known) = self.0.get_mut(&key) {
                *known = until;
            } else {
                if self.0.len() >= MAX_OUTBOUND_FLOWS {
                    self.0.retain(|_, t| now < *t);
                }
                if self.0.len() < MAX_OUTBOUND_FLOWS {
                    self.0.insert(key, until);
                }
            }
        }
        rules_verdict
    }

    fn live(&self, key: &FlowKey, now: Instant) -> bool {
        self.0.get(key).is_some_and(|t| now < *t)
    }
}

/// The counters after one more frame with this verdict.
fn bumped(mut c: FilterCounters, v: Verdict, len: usize, outbound: bool) -> FilterCounters {
    match v {
        Verdict::Pass if outbound => {
            c.passed_out_frames += 1;
            c.passed_out_bytes += len as u64;
        }
        Verdict::Pass => {
            c.passed_in_frames += 1;
            c.passed_in_bytes += len as u64;
        }
        Verdict::Drop(DropReason::Malformed) => c.dropped_malformed += 1,
        Verdict::Drop(DropReason::NotIpv4) => c.dropped_not_ipv4 += 1,
        Verdict::Drop(DropReason::Rule(i)) => c.dropped_by_rule[i] += 1,
        Verdict::Drop(DropReason::Builtin(i)) => c.dropped_builtin[i] += 1,
        Verdict::Drop(DropReason::Default) => c.dropped_default += 1,
        Verdict::Drop(DropReason::DnsAnswer(_)) => c.dropped_dns_answers += 1,
    }
    c
}

/// A DNS answer built from records, as the reference understands it.
#[derive(Default)]
struct Built {
    msg: Vec<u8>,
    /// Every record well formed (no hostile pointer).
    clean: bool,
    /// QR set.
    response: bool,
    /// One question, opcode 0, NOERROR.
    learnable: bool,
    question: String,
    /// Every name in the question and answer sections (owners and CNAME targets).
    names: Vec<String>,
    cnames: Vec<(String, String)>,
    /// A records: owner, address, TTL.
    a: Vec<(String, Ipv4Addr, u32)>,
}

impl Built {
    fn new(question: &str, flags_sel: u8) -> Built {
        let (flags, questions): (u16, u16) = match flags_sel % 8 {
            5 => (0x8183, 1), // NXDOMAIN
            6 => (0x0100, 1), // a query, not a response
            7 => (0x8180 | 2 << 11, 1),
            4 if flags_sel & 0x80 != 0 => (0x8180, 2),
            _ => (0x8180, 1),
        };
        let mut msg = vec![0x12, 0x34];
        msg.extend(flags.to_be_bytes());
        msg.extend(questions.to_be_bytes());
        msg.extend([0, 0, 0, 0, 0, 0]);
        for _ in 0..questions {
            msg.extend(wire(question));
            msg.extend([0, 1, 0, 1]);
        }
        Built {
            msg,
            clean: true,
            response: flags & 0x8000 != 0,
            learnable: questions == 1 && flags & 0x780f == 0,
            question: norm(question),
            names: vec![norm(question); usize::from(questions)],
            ..Built::default()
        }
    }

    fn record(&mut self, owner: &[u8], rtype: u16, ttl: u32, rdata: &[u8]) {
        let count = be16(&self.msg, 6) + 1;
        self.msg[6..8].copy_from_slice(&count.to_be_bytes());
        self.msg.extend(owner);
        self.msg.extend(rtype.to_be_bytes());
        self.msg.extend([0, 1]);
        self.msg.extend(ttl.to_be_bytes());
        self.msg.extend((rdata.len() as u16).to_be_bytes());
        self.msg.extend(rdata);
    }

    /// One record from the input: `kind`, `owner`, `ttl`, then what the kind needs.
    fn record_from(&mut self, input: &mut Input) {
        let kind = input.u8();
        let owner_sel = input.u8();
        let ttl = TTLS[usize::from(input.u8()) % TTLS.len()];
        let (owner_wire, owner) = if owner_sel & 0x80 != 0 {
            (vec![0xc0, 12], self.question.clone()) // pointer to the question
        } else {
            let name = NAMES[usize::from(owner_sel) % NAMES.len()];
            (wire(name), norm(name))
        };
        match kind % 5 {
            0 | 1 => {
                let addr = input.pick_addr();
                self.record(&owner_wire, 1, ttl, &addr.octets());
                self.names.push(owner.clone());
                self.a.push((owner, addr, ttl));
            }
            2 => {
                let target = NAMES[usize::from(input.u8()) % NAMES.len()];
                self.record(&owner_wire, 5, ttl, &wire(target));
                self.names.push(owner.clone());
                self.names.push(norm(target));
                self.cnames.push((owner, norm(target)));
            }
            3 => {
                // AAAA: read past, learns nothing.
                self.record(&owner_wire, 28, ttl, &[0x20; 16]);
                self.names.push(owner);
            }
            _ => {
                // A hostile owner: a pointer to itself, forward, or a label looping back.
                let at = self.msg.len();
                let hostile = match input.u8() % 3 {
                    0 => vec![0xc0 | (at >> 8) as u8, at as u8],
                    1 => vec![0xc0 | ((at + 16) >> 8) as u8, (at + 16) as u8],
                    _ => vec![1, b'x', 0xc0 | (at >> 8) as u8, at as u8],
                };
                self.record(&hostile, 1, ttl, &[1, 2, 3, 4]);
                self.clean = false;
            }
        }
    }

    /// The question and the CNAME targets reachable from it.
    fn chain(&self) -> Vec<String> {
        let mut chain = vec![self.question.clone()];
        loop {
            let before = chain.len();
            for (owner, target) in &self.cnames {
                if chain.contains(owner) && !chain.contains(target) {
                    chain.push(target.clone());
                }
            }
            if chain.len() == before {
                return chain;
            }
        }
    }
}

fn learned_map(f: &EgressFilter) -> HashMap<(Ipv4Addr, usize), Instant> {
    f.learned().map(|l| ((l.addr, l.rule), l.expires)).collect()
}

struct Harness {
    filter: EgressFilter,
    policy: EgressPolicy,
    now: Instant,
    frames: u64,
    /// Every 4-byte window of what the resolver sent: learned addresses must come from there.
    resolver_said: HashSet<[u8; 4]>,
    flows: ReferenceFlows,
}

impl Harness {
    /// The resolver's address as the policy has it (or the usual one when it has none).
    fn resolver(&self) -> Ipv4Addr {
        self.policy.dns.unwrap_or(RESOLVER)
    }

    fn outbound(&mut self, frame: &[u8]) {
        let learned: Vec<Learned> = self.filter.learned().collect();
        let before = self.filter.counters();
        let v = self.filter.outbound(frame, self.now);
        self.frames += 1;
        self.check_counters(before, v, frame.len(), true);
        let by_rules = reference_outbound(&self.policy, &learned, frame, self.now);
        let parsed = reference_parse(&self.policy, frame);
        let flow_was_live = match &parsed {
            Ok(Some(Parsed {
                dst,
                flow: Some((protocol, sport, dport)),
                ..
            })) => self
                .flows
                .live(&(*protocol, u32::from(*dst), *dport, *sport), self.now),
            _ => false,
        };
        let expected = match &parsed {
            Ok(Some(p)) => self
                .flows
                .decide(&self.policy, &learned, p, by_rules, self.now),
            _ => by_rules,
        };
        assert_eq!(v, expected, "outbound verdict");
        // The promise of the builtin ranges, on its own.
        if let (Verdict::Pass, Ok(Some(p))) = (v, parsed) {
            if !p.exempt && BUILTIN_DENY.iter().any(|(_, c)| contains(c, p.dst)) {
                let by_rule = self.policy.rules.iter().any(|r| {
                    r.action == Action::Allow
                        && matches!(&r.target, Target::Net(c) if contains(c, p.dst))
                });
                let by_domain = learned.iter().any(|l| {
                    l.addr == p.dst
                        && self.now < l.expires
                        && self.policy.rules[l.rule].action == Action::Allow
                });
                // A remembered flow was let out by a learned allowed domain earlier.
                assert!(by_rule || by_domain || flow_was_live, "{} passed", p.dst);
            }
        }
    }

    /// A frame for the guest.
    fn inbound(&mut self, frame: &[u8]) -> Verdict {
        if frame.len() >= 34 + 8 && frame[26..30] == self.resolver().octets() {
            for w in frame[42..].windows(4) {
                self.resolver_said.insert([w[0], w[1], w[2], w[3]]);
            }
        }
        let before = self.filter.counters();
        let v = self.filter.inbound(frame, self.now);
        self.frames += 1;
        self.check_counters(before, v, frame.len(), false);
        if let Verdict::Drop(reason) = v {
            let DropReason::DnsAnswer(i) = reason else {
                panic!("inbound drop for {reason:?}")
            };
            let r = &self.policy.rules[i];
            assert!(r.action == Action::Deny && matches!(r.target, Target::Domain(_)));
        }
        v
    }

    fn check_counters(&self, before: FilterCounters, v: Verdict, len: usize, outbound: bool) {
        let after = self.filter.counters();
        assert_eq!(
            after,
            bumped(before, v, len, outbound),
            "counters after {v:?}"
        );
        assert_eq!(after.frames(), self.frames);
        assert!(self.filter.learned_len() <= MAX_LEARNED);
    }

    fn answer_frame(&self, source: u8, payload: &[u8]) -> (Vec<u8>, bool) {
        let resolver = self.resolver();
        // Some other server on port 53: never the resolver, whatever address the policy chose.
        let stranger = if resolver == Ipv4Addr::new(8, 8, 8, 8) {
            Ipv4Addr::new(9, 9, 9, 9)
        } else {
            Ipv4Addr::new(8, 8, 8, 8)
        };
        match source % 8 {
            5 => (udp(stranger, 53, GUEST, 40000, 0, payload), false),
            6 => (udp(resolver, 5353, GUEST, 40000, 0, payload), false),
            7 => (udp(resolver, 53, GUEST, 40000, MF, payload), false),
            _ => (udp(resolver, 53, GUEST, 40000, 0, payload), true),
        }
    }

    /// Sends a built answer and checks the verdict and what was learned against the reference.
    fn built_answer(&mut self, source: u8, built: &Built) {
        let (frame, from_resolver) = self.answer_frame(source, &built.msg);
        let inspected = from_resolver && self.policy.dns.is_some() && built.response;
        let before = learned_map(&self.filter);
        let v = self.inbound(&frame);
        let after = learned_map(&self.filter);
        for (key, expires) in &before {
            if let Some(now_expires) = after.get(key) {
                assert!(
                    now_expires >= expires,
                    "{key:?}: learning again shortened it"
                );
            }
        }
        if !built.clean {
            // Every hostile record is malformed (a pointer to itself, forward, or back to its
            // own run): the message teaches nothing. Whether it is dropped depends on the
            // names read before the fault; `inbound` checked the reason.
            assert_eq!(before, after, "learned from a malformed answer");
            return;
        }
        let deny_rule = |names: &[String]| {
            self.policy.rules.iter().position(|r| {
                r.action == Action::Deny
                    && matches!(&r.target, Target::Domain(p)
                        if names.iter().any(|n| name_matches(&p.to_string(), n)))
            })
        };
        let expected = match deny_rule(&built.names) {
            Some(i) if inspected => Verdict::Drop(DropReason::DnsAnswer(i)),
            _ => Verdict::Pass,
        };
        assert_eq!(v, expected, "answer verdict");
        if !(inspected && built.learnable) {
            assert_eq!(before, after, "learned from an answer that may not teach");
            return;
        }
        // What the answer gives: (address, rule) -> the longest clamped TTL among its records.
        let chain = built.chain();
        let mut gives: HashMap<(Ipv4Addr, usize), Duration> = HashMap::new();
        for (i, r) in self.policy.rules.iter().enumerate() {
            let Target::Domain(p) = &r.target else {
                continue;
            };
            let p = p.to_string();
            let hit = match r.action {
                Action::Allow => name_matches(&p, &built.question),
                Action::Deny => chain.iter().any(|n| name_matches(&p, n)),
            };
            for (owner, addr, ttl) in built.a.iter().filter(|_| hit) {
                if chain.contains(owner) {
                    let ttl = if *ttl > i32::MAX as u32 { 0 } else { *ttl };
                    let ttl = Duration::from_secs(u64::from(ttl)).clamp(MIN_TTL, MAX_TTL);
                    let e = gives.entry((*addr, i)).or_default();
                    *e = (*e).max(ttl);
                }
            }
        }
        for (&(addr, rule), &ttl) in &gives {
            let expires = after
                .get(&(addr, rule))
                .unwrap_or_else(|| panic!("{addr} not learned for rule {rule}"));
            assert!(*expires >= self.now + ttl, "{addr}: expires too early");
        }
        for (key, expires) in &after {
            assert!(
                before.get(key) == Some(expires) || gives.contains_key(key),
                "{key:?} learned from an answer that does not give it"
            );
        }
    }

    fn check_learned(&self) {
        for l in self.filter.learned() {
            assert!(
                matches!(self.policy.rules[l.rule].target, Target::Domain(_)),
                "learned for a network rule"
            );
            assert!(
                self.resolver_said.contains(&l.addr.octets()),
                "{} was never sent by the resolver",
                l.addr
            );
            assert!(l.expires <= self.now + MAX_TTL);
        }
    }
}

/// A frame from the guest built from fields, maybe with one header field corrupted.
fn out_frame(input: &mut Input) -> Vec<u8> {
    let dst = input.pick_addr();
    let protocol = match input.u8() % 4 {
        0 => UDP,
        1 => TCP,
        2 => 1,
        _ => input.u8(),
    };
    let port = match input.u8() % 4 {
        0 => 53,
        1 => 54,
        2 => 443,
        _ => input.u16(),
    };
    let frag = [0, MF, 1, MF | 1][usize::from(input.u8() % 4)];
    let len_sel = input.u8();
    // Two source ports, so distinct flows to one destination occur.
    let sport: u16 = 40000 + u16::from((len_sel >> 3) & 1);
    let mut l4 = sport.to_be_bytes().to_vec();
    l4.extend(port.to_be_bytes());
    if protocol == TCP {
        l4.extend([0; 8]);
        l4.push([0x50, 0x40, 0xf0, 0x60][usize::from(len_sel >> 6)]);
        l4.extend([0x02, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        l4.extend([0, 12, 0, 0, b'p', b'i', b'n', b'g']);
    }
    l4.truncate([l4.len(), 0, 3, 7, 8, 19, 20][usize::from(len_sel) % 7]);
    let mut f = ipv4(GUEST, dst, protocol, frag, &l4);
    match input.u8() % 8 {
        4 => f[14] = 0x40 | (input.u8() & 15),
        5 => f[16..18].copy_from_slice(&input.u16().to_be_bytes()),
        6 => f[14] = (input.u8() & 0xf0) | 5,
        7 => {
            let keep = usize::from(input.u8()) % f.len();
            f.truncate(keep);
        }
        3 => f[12..14].copy_from_slice(&input.u16().to_be_bytes()),
        _ => {}
    }
    f
}

fn target(data: &[u8]) {
    drive(data);
}

/// Runs one input; the harness after it, for the seed checks.
fn drive(data: &[u8]) -> Harness {
    let mut input = Input(data);
    let policy = policy_from(&mut input);
    let mut h = Harness {
        filter: EgressFilter::new(policy.clone()),
        policy,
        now: Instant::now(),
        frames: 0,
        resolver_said: HashSet::new(),
        flows: ReferenceFlows::default(),
    };
    for _ in 0..MAX_EVENTS {
        if input.is_empty() {
            break;
        }
        match input.u8() % EVENTS {
            e if e == Event::Out as u8 => {
                let f = out_frame(&mut input);
                h.outbound(&f);
            }
            e if e == Event::OutRaw as u8 => {
                let n = usize::from(input.u8()) * 2;
                let f = input.bytes(n);
                h.outbound(&f);
            }
            e if e == Event::Answer as u8 => {
                let source = input.u8();
                let question = NAMES[usize::from(input.u8()) % NAMES.len()];
                let mut built = Built::new(question, input.u8());
                for _ in 0..input.u8() % 7 {
                    built.record_from(&mut input);
                }
                h.built_answer(source, &built);
            }
            e if e == Event::Bulk as u8 => {
                let source = input.u8();
                let question = NAMES[usize::from(input.u8()) % NAMES.len()];
                let count = input.u8() % 65;
                let ttl = TTLS[usize::from(input.u8()) % TTLS.len()];
                let base = u32::from_be_bytes(input.addr());
                let mut built = Built::new(question, 0);
                for i in 0..u32::from(count) {
                    let addr = Ipv4Addr::from(base.wrapping_add(i));
                    built.record(&[0xc0, 12], 1, ttl, &addr.octets());
                    built.a.push((built.question.clone(), addr, ttl));
                }
                h.built_answer(source, &built);
            }
            e if e == Event::AnswerRaw as u8 => {
                let source = input.u8();
                let n = usize::from(input.u8()) * 2;
                let payload = input.bytes(n);
                let (f, _) = h.answer_frame(source, &payload);
                h.inbound(&f);
            }
            e if e == Event::InRaw as u8 => {
                let n = usize::from(input.u8()) * 2;
                let f = input.bytes(n);
                h.inbound(&f);
            }
            _ => {
                let b = input.u8();
                let secs = u64::from(b & 0x7f) * if b & 0x80 != 0 { 60 } else { 1 };
                h.now += Duration::from_secs(secs);
            }
        }
    }
    h.check_learned();
    h
}

#[test]
fn net_filter() {
    fuzz_support::run("net_filter", target);
}

/// Builds seed inputs: a policy, then events.
struct Seed(Vec<u8>);

/// A rule selector: (deny, domain, table index).
fn rule(deny: bool, domain: bool, index: usize) -> u8 {
    (index as u8) << 2 | u8::from(domain) << 1 | u8::from(deny)
}

fn net(s: &str) -> usize {
    NETS.iter().position(|n| *n == s).unwrap()
}

fn dom(s: &str) -> usize {
    DOMAINS.iter().position(|n| *n == s).unwrap()
}

fn name(s: &str) -> u8 {
    NAMES.iter().position(|n| *n == s).unwrap() as u8
}

fn addr(a: [u8; 4]) -> u8 {
    ADDRS.iter().position(|x| *x == a).unwrap() as u8
}

impl Seed {
    /// rules: a selector each (and a raw network's 5 bytes after it); dns: 0 the usual
    /// resolver, 1 none; default deny or not.
    fn policy(rules: &[&[u8]], dns: u8, default_deny: bool) -> Seed {
        let mut s = vec![rules.len() as u8];
        s.extend(rules.concat());
        s.push(dns);
        s.push(u8::from(default_deny));
        Seed(s)
    }

    fn ev(mut self, e: Event, args: &[u8]) -> Self {
        self.0.push(e as u8);
        self.0.extend(args);
        self
    }

    /// A TCP packet to port 443 of a table address.
    fn out(self, dst: [u8; 4]) -> Self {
        self.ev(Event::Out, &[addr(dst), 1, 2, 0, 0, 0])
    }

    /// The same from the other source port: another connection.
    fn out_new_connection(self, dst: [u8; 4]) -> Self {
        self.ev(Event::Out, &[addr(dst), 1, 2, 0, 56, 0])
    }

    /// An answer from the resolver: question, flags, then records (kind, owner, ttl, data).
    fn answer(self, question: &str, flags: u8, records: &[[u8; 4]]) -> Self {
        let mut args = vec![0, name(question), flags, records.len() as u8];
        for r in records {
            args.extend(r);
        }
        self.ev(Event::Answer, &args)
    }

    fn time(self, secs: u8) -> Self {
        self.ev(Event::Time, &[secs])
    }
}

/// Record selectors for [`Seed::answer`].
const QOWNER: u8 = 0x80;
fn a_rec(owner: u8, ttl: usize, to: [u8; 4]) -> [u8; 4] {
    [0, owner, ttl as u8, addr(to)]
}
fn cname_rec(owner: u8, ttl: usize, target: &str) -> [u8; 4] {
    [2, owner, ttl as u8, name(target)]
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let example = [93, 184, 216, 34];
    let allow_domain = Seed::policy(&[&[rule(false, true, dom("*.example.com"))]], 0, true)
        .out(example)
        .answer(
            "www.example.com",
            0,
            &[
                cname_rec(QOWNER, 3, "edge.cdn.net"),
                a_rec(name("edge.cdn.net"), 3, example),
            ],
        )
        .out(example)
        .time(59)
        .out(example)
        .time(2)
        .out_new_connection(example)
        .out(example);
    let deny_domain = Seed::policy(&[&[rule(true, true, dom("*.tracker.test"))]], 0, false)
        .answer(
            "a.test",
            0,
            &[
                cname_rec(QOWNER, 4, "x.tracker.test."),
                a_rec(name("x.tracker.test."), 4, [8, 8, 8, 8]),
            ],
        )
        .out([8, 8, 8, 8])
        .answer("x.tracker.test.", 5, &[])
        .answer("other.org", 0, &[a_rec(QOWNER, 3, [1, 1, 1, 1])]);
    let builtin = {
        let mut s = Seed::policy(&[&[rule(false, false, net("10.0.2.2"))]], 0, false);
        for a in ADDRS {
            s = s.out(a);
        }
        s
    };
    let exemption = Seed::policy(&[&[rule(true, false, net("10.0.2.0/24"))]], 0, false)
        .ev(Event::Out, &[addr([10, 0, 2, 3]), 0, 0, 0, 0, 0]) // UDP 53
        .ev(Event::Out, &[addr([10, 0, 2, 3]), 1, 0, 0, 0, 0]) // TCP 53
        .ev(Event::Out, &[addr([10, 0, 2, 3]), 0, 1, 0, 0, 0]) // port 54
        .ev(Event::Out, &[addr([10, 0, 2, 2]), 0, 0, 0, 0, 0]) // another address
        .ev(Event::Out, &[addr([10, 0, 2, 3]), 0, 0, 1, 0, 0]) // more fragments
        .ev(Event::Out, &[addr([10, 0, 2, 3]), 0, 0, 2, 0, 0]) // offset
        .ev(Event::Out, &[addr([10, 0, 2, 3]), 0, 0, 0, 3, 0]) // 7-byte UDP header
        .ev(Event::Out, &[addr([10, 0, 2, 3]), 1, 0, 0, 0x46, 0]) // TCP data offset 16
        .ev(Event::Out, &[addr([10, 0, 2, 3]), 1, 0, 0, 0xc4, 0]); // TCP data offset 24 of 20
    let specific = Seed::policy(
        &[
            &[rule(true, false, net("9.9.9.0/24"))],
            &[rule(false, false, net("9.9.9.9"))],
            &[rule(false, true, dom("a.test"))],
            &[rule(true, true, dom("tracker.test"))],
            &[rule(false, false, net("0.0.0.0/0"))],
        ],
        0,
        true,
    )
    .out([9, 9, 9, 9])
    .out([9, 9, 9, 10])
    .answer("a.test", 0, &[a_rec(QOWNER, 4, [9, 9, 9, 10])])
    .out([9, 9, 9, 10])
    .answer("tracker.test", 0, &[a_rec(QOWNER, 4, [9, 9, 9, 9])])
    .out([9, 9, 9, 9])
    .out([169, 254, 169, 254]);
    let hostile_dns = Seed::policy(&[&[rule(false, true, dom("*.test"))]], 0, true)
        .answer("a.test", 0, &[[4, 0, 3, 0], a_rec(QOWNER, 3, [1, 1, 1, 1])])
        .answer("a.test", 0, &[a_rec(QOWNER, 3, [1, 1, 1, 1]), [4, 0, 3, 1]])
        .answer("b.test", 0, &[[4, 0, 3, 2]])
        .ev(
            Event::AnswerRaw,
            &[0, 4, 0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1],
        )
        .out([1, 1, 1, 1]);
    let mut cap = Seed::policy(&[&[rule(false, true, dom("*.test"))]], 0, true);
    for i in 0..70u8 {
        cap = cap.ev(Event::Bulk, &[0, name("a.test"), 64, 4, 11, i, 0, 0]);
    }
    cap = cap.out([1, 1, 1, 1]);
    let cap = cap.ev(Event::Out, &[0xf0, 11, 0, 0, 0, 1, 2, 0, 0, 0]);
    let ttl = Seed::policy(
        &[
            &[rule(false, true, dom("a.test"))],
            &[rule(true, true, dom("*.tracker.test"))],
        ],
        0,
        true,
    )
    .answer("a.test", 0, &[a_rec(QOWNER, 0, [1, 1, 1, 1])]) // TTL 0: 1 s
    .answer("x.tracker.test.", 0, &[a_rec(QOWNER, 5, [8, 8, 8, 8])]) // a day: 1 h
    .answer("a.test", 0, &[a_rec(QOWNER, 6, [9, 9, 9, 9])]) // top bit set: 0, so 1 s
    .out([1, 1, 1, 1])
    .out([8, 8, 8, 8])
    .time(1)
    .out_new_connection([1, 1, 1, 1])
    .out([9, 9, 9, 9])
    .time(0x80 | 59)
    .out([8, 8, 8, 8])
    .time(0x80 | 1)
    .out([8, 8, 8, 8]);
    let malformed = Seed::policy(&[], 1, false)
        .ev(Event::Out, &[addr([1, 1, 1, 1]), 0, 2, 0, 0, 4, 4])
        .ev(Event::Out, &[addr([1, 1, 1, 1]), 0, 2, 0, 0, 5, 0xff, 0xff])
        .ev(Event::Out, &[addr([1, 1, 1, 1]), 0, 2, 0, 0, 6, 0x60])
        .ev(Event::Out, &[addr([1, 1, 1, 1]), 0, 2, 0, 0, 7, 20])
        .ev(Event::Out, &[addr([1, 1, 1, 1]), 0, 2, 0, 0, 3, 0xdd, 0x86])
        .ev(Event::Out, &[addr([1, 1, 1, 1]), 0, 2, 0, 0, 3, 0x06, 0x08])
        .ev(
            Event::OutRaw,
            &[7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0],
        )
        .ev(Event::InRaw, &[3, 1, 2, 3, 4, 5, 6]);
    let unchecked = Seed::policy(
        &[
            &[rule(true, false, 63), 10, 0, 2, 1, 35], // 10.0.2.1/35
            &[rule(false, true, dom("a.test"))],
        ],
        1,
        true,
    )
    .out([10, 0, 2, 2])
    .answer("a.test", 0, &[a_rec(QOWNER, 3, [1, 1, 1, 1])])
    .out([1, 1, 1, 1]);
    vec![
        ("allow-domain-learn", allow_domain.0),
        ("deny-domain-answer", deny_domain.0),
        ("builtin-ranges", builtin.0),
        ("dns-exemption", exemption.0),
        ("most-specific", specific.0),
        ("hostile-dns", hostile_dns.0),
        ("learned-cap", cap.0),
        ("ttl-expiry", ttl.0),
        ("malformed-frames", malformed.0),
        ("unchecked-policy", unchecked.0),
    ]
}

/// The committed seeds are exactly what [`seeds`] builds; with
/// `SUPERMACHINE_FUZZ_WRITE_SEEDS=1` they are (re)written instead.
#[test]
fn seed_corpus() {
    fuzz_support::check_seeds("net_filter", &seeds());
}

/// The seeds reach what they are named for (so a change to the input format that turns them
/// into noise is noticed).
#[test]
fn seeds_do_what_they_say() {
    let seeds = seeds();
    let run = |name: &str| {
        let (_, bytes) = seeds.iter().find(|(n, _)| *n == name).unwrap();
        let h = drive(bytes);
        (h.filter.counters(), h)
    };
    let (c, _) = run("allow-domain-learn");
    // After the TTL a new connection is refused; the one the address let out goes on.
    assert_eq!((c.passed_out_frames, c.dropped_default), (3, 2));
    let (c, _) = run("deny-domain-answer");
    assert_eq!(
        (
            c.dropped_dns_answers,
            c.dropped_by_rule[0],
            c.passed_in_frames
        ),
        (2, 1, 1)
    );
    let (c, _) = run("builtin-ranges");
    assert!(c.dropped_builtin.iter().all(|&n| n > 0), "{c:?}");
    assert_eq!(
        c.passed_out_frames,
        (ADDRS.len() - c.dropped_builtin.iter().sum::<u64>() as usize) as u64
    );
    let (c, _) = run("dns-exemption");
    assert_eq!(c.passed_out_frames, 2, "{c:?}");
    assert_eq!(c.dropped_by_rule[0], 7, "{c:?}");
    let (c, _) = run("most-specific");
    // 9.9.9.10 by the /24 deny, then 9.9.9.9 by the learned deny tying with the /32 allow.
    assert_eq!(c.dropped_by_rule, [1, 0, 0, 1, 0], "{c:?}");
    assert_eq!(c.passed_out_frames, 3, "{c:?}");
    let (c, h) = run("hostile-dns");
    assert_eq!((h.filter.learned_len(), c.dropped_default), (0, 1));
    let (c, h) = run("learned-cap");
    assert_eq!(h.filter.learned_len(), MAX_LEARNED);
    assert_eq!((c.passed_out_frames, c.dropped_default), (0, 2), "{c:?}");
    let (c, _) = run("ttl-expiry");
    assert_eq!(c.passed_out_frames, 1, "{c:?}");
    assert_eq!((c.dropped_by_rule[1], c.dropped_default), (2, 3), "{c:?}");
    let (c, _) = run("malformed-frames");
    assert_eq!((c.dropped_malformed, c.dropped_not_ipv4), (5, 1), "{c:?}");
    let (c, h) = run("unchecked-policy");
    assert!(h.policy.check().is_err());
    assert_eq!((c.dropped_builtin[1], c.dropped_default), (1, 1), "{c:?}");
}
