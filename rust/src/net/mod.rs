//! The egress policy of a VM's network card, enforced on the host side of the device.
//!
//! The virtio-net device hands every frame the guest transmits to
//! [`EgressFilter::outbound`] before it goes to the backend, and every frame for the guest to
//! [`EgressFilter::inbound`]; a frame with [`Verdict::Drop`] goes nowhere. The guest cannot
//! change any of it: the policy lives in the VMM process and only ever reads guest frames.
//!
//! * [`EgressPolicy`] is the configuration: network and domain rules (allow or deny), the
//!   guest's DNS resolver and the default action; its doc says how a destination is decided.
//!   Private, loopback, link-local (cloud metadata), multicast and other special ranges
//!   ([`BUILTIN_DENY`]) are denied unless a user rule covers them.
//! * [`EgressFilter`] applies it, learns the addresses of allowed and denied domains from the
//!   resolver's DNS answers, and counts every frame once ([`FilterCounters`]).
//!
//! IPv4 only: the guest has no IPv6, and any frame that is neither IPv4 nor ARP is dropped.
//! Everything is bounded (rules, learned addresses, DNS parsing) and the per-frame path does
//! not allocate. No I/O, no threads: the device drives it, tests and fuzzing drive it the same
//! way with a simulated clock.

mod dns;
mod filter;
mod frame;
mod policy;

pub use filter::{
    DropReason, EgressFilter, FilterCounters, Learned, Verdict, DNS_PORT, MAX_INBOUND_FLOWS,
    MAX_LEARNED, MAX_OUTBOUND_FLOWS, MAX_TTL, MIN_TTL, TCP_FLOW_IDLE, UDP_FLOW_IDLE,
};
pub use policy::{
    Action, Cidr, DomainPattern, EgressPolicy, PolicyError, Rule, Target, BUILTIN_DENY,
    MAX_DOMAIN_LEN, MAX_LABEL_LEN, MAX_PUBLISHED, MAX_RULES,
};
