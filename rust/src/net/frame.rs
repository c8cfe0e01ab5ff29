//! Just enough Ethernet, IPv4, UDP and TCP header parsing to filter frames: bounds-checked reads
//! of a borrowed slice, no allocation, no trust in any length field the frame carries.

use std::net::Ipv4Addr;

pub(crate) const ETH_HEADER_LEN: usize = 14;
pub(crate) const ETHERTYPE_IPV4: u16 = 0x0800;
pub(crate) const ETHERTYPE_ARP: u16 = 0x0806;
pub(crate) const IPV4_MIN_HEADER_LEN: usize = 20;
pub(crate) const PROTO_TCP: u8 = 6;
pub(crate) const PROTO_UDP: u8 = 17;
pub(crate) const UDP_HEADER_LEN: usize = 8;
pub(crate) const TCP_MIN_HEADER_LEN: usize = 20;
const IP_MORE_FRAGMENTS: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

/// The frame is too short for its headers or its IPv4 header contradicts itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

/// What an Ethernet frame carries, as far as the filter cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Frame<'a> {
    Arp,
    Ipv4(Ipv4<'a>),
    /// Any other EtherType (IPv6, VLAN tags, 802.3 lengths, ...).
    Other,
}

/// A checked IPv4 packet: header fields and the payload up to the total length (Ethernet
/// padding past it is not part of the packet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ipv4<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    /// More-fragments set or a non-zero fragment offset.
    pub fragment: bool,
    pub payload: &'a [u8],
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn addr(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// Parses an Ethernet frame (no virtio-net header).
pub(crate) fn parse(frame: &[u8]) -> Result<Frame<'_>, Malformed> {
    if frame.len() < ETH_HEADER_LEN {
        return Err(Malformed);
    }
    match be16(frame, 12) {
        ETHERTYPE_ARP => Ok(Frame::Arp),
        ETHERTYPE_IPV4 => parse_ipv4(&frame[ETH_HEADER_LEN..]).map(Frame::Ipv4),
        _ => Ok(Frame::Other),
    }
}

fn parse_ipv4(p: &[u8]) -> Result<Ipv4<'_>, Malformed> {
    if p.len() < IPV4_MIN_HEADER_LEN || p[0] >> 4 != 4 {
        return Err(Malformed);
    }
    let header_len = usize::from(p[0] & 0x0f) * 4;
    let total_len = usize::from(be16(p, 2));
    if header_len < IPV4_MIN_HEADER_LEN || total_len < header_len || total_len > p.len() {
        return Err(Malformed);
    }
    let frag = be16(p, 6);
    Ok(Ipv4 {
        src: addr(p, 12),
        dst: addr(p, 16),
        protocol: p[9],
        fragment: frag & (IP_MORE_FRAGMENTS | IP_OFFSET_MASK) != 0,
        payload: &p[header_len..total_len],
    })
}

/// Source and destination port of an unfragmented UDP packet, and its payload (up to the UDP
/// length when that is consistent, else `None`: a datagram whose header lies is not read).
pub(crate) fn udp<'a>(ip: &Ipv4<'a>) -> Option<(u16, u16, &'a [u8])> {
    let p = ip.payload;
    if ip.fragment || ip.protocol != PROTO_UDP || p.len() < UDP_HEADER_LEN {
        return None;
    }
    let len = usize::from(be16(p, 4));
    if len < UDP_HEADER_LEN || len > p.len() {
        return None;
    }
    Some((be16(p, 0), be16(p, 2), &p[UDP_HEADER_LEN..len]))
}

/// Protocol, source port, destination port and (TCP) flags of an unfragmented UDP or TCP
/// packet whose transport header is complete.
pub(crate) fn ports(ip: &Ipv4<'_>) -> Option<(u8, u16, u16, u8)> {
    let dst = dst_port(ip)?;
    let p = ip.payload;
    let flags = if ip.protocol == PROTO_TCP { p[13] } else { 0 };
    Some((ip.protocol, be16(p, 0), dst, flags))
}

/// The destination port of an unfragmented UDP or TCP packet whose transport header is
/// complete (for TCP: the data offset is sane and within the packet).
pub(crate) fn dst_port(ip: &Ipv4<'_>) -> Option<u16> {
    let p = ip.payload;
    if ip.fragment {
        return None;
    }
    match ip.protocol {
        PROTO_UDP if p.len() >= UDP_HEADER_LEN => Some(be16(p, 2)),
        PROTO_TCP if p.len() >= TCP_MIN_HEADER_LEN => {
            let data_offset = usize::from(p[12] >> 4) * 4;
            (TCP_MIN_HEADER_LEN..=p.len())
                .contains(&data_offset)
                .then(|| be16(p, 2))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_frame(total_len: u16, ihl: u8, extra: usize) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HEADER_LEN];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let mut ip = vec![0u8; usize::from(total_len).max(IPV4_MIN_HEADER_LEN) + extra];
        ip[0] = 0x40 | ihl;
        ip[2..4].copy_from_slice(&total_len.to_be_bytes());
        ip[9] = PROTO_UDP;
        ip[16..20].copy_from_slice(&[1, 2, 3, 4]);
        f.extend(ip);
        f
    }

    #[test]
    fn header_checks() {
        assert_eq!(parse(&[0; 13]), Err(Malformed));
        let padded = ipv4_frame(28, 5, 18);
        let Frame::Ipv4(ip) = parse(&padded).unwrap() else {
            panic!("not IPv4")
        };
        assert_eq!(ip.dst, Ipv4Addr::new(1, 2, 3, 4));
        assert_eq!(ip.payload.len(), 8, "Ethernet padding is not payload");
        assert_eq!(parse(&ipv4_frame(20, 4, 0)), Err(Malformed), "IHL < 5");
        assert_eq!(
            parse(&ipv4_frame(20, 6, 0)),
            Err(Malformed),
            "header > total"
        );
        assert_eq!(
            parse(&ipv4_frame(19, 5, 0)),
            Err(Malformed),
            "total < header"
        );
        let mut long = ipv4_frame(40, 5, 0);
        long.truncate(long.len() - 1);
        assert_eq!(parse(&long), Err(Malformed), "total > frame");
        let mut v6 = ipv4_frame(20, 5, 0);
        v6[ETH_HEADER_LEN] = 0x65;
        assert_eq!(parse(&v6), Err(Malformed), "version 6 under EtherType IPv4");
        let mut short = ipv4_frame(20, 5, 0);
        short.truncate(ETH_HEADER_LEN + 19);
        assert_eq!(parse(&short), Err(Malformed));
        let mut arp = vec![0u8; ETH_HEADER_LEN];
        arp[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        assert_eq!(parse(&arp), Ok(Frame::Arp));
        arp[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(parse(&arp), Ok(Frame::Other));
    }

    #[test]
    fn transport_headers() {
        let mut f = ipv4_frame(28, 5, 0);
        let udp_at = ETH_HEADER_LEN + 20;
        f[udp_at + 2..udp_at + 4].copy_from_slice(&53u16.to_be_bytes());
        f[udp_at + 4..udp_at + 6].copy_from_slice(&8u16.to_be_bytes());
        let Ok(Frame::Ipv4(ip)) = parse(&f) else {
            panic!()
        };
        assert_eq!(dst_port(&ip), Some(53));
        assert_eq!(udp(&ip), Some((0, 53, &[][..])));
        f[udp_at + 4..udp_at + 6].copy_from_slice(&9u16.to_be_bytes());
        let Ok(Frame::Ipv4(ip)) = parse(&f) else {
            panic!()
        };
        assert_eq!(udp(&ip), None, "UDP length past the packet");
        let frag = Ipv4 {
            fragment: true,
            ..ip
        };
        assert_eq!(dst_port(&frag), None);
        let tcp = Ipv4 {
            protocol: PROTO_TCP,
            ..ip
        };
        assert_eq!(dst_port(&tcp), None, "8 bytes are no TCP header");
    }
}
