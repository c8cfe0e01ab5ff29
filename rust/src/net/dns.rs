//! A bounded reader of DNS responses (RFC 1035): the header, the question and the answer
//! records, nothing else (authority and additional records are never looked at: a resolver's
//! answer to the question is in the answer section).
//!
//! Every bound is fixed: names are at most 255 bytes on the wire, compression pointers are
//! followed at most [`MAX_POINTER_HOPS`] times and only to a point before where the current
//! run of labels began (so they cannot loop, even without the hop limit), at most
//! [`MAX_QUESTIONS`] questions and [`MAX_ANSWERS`] answer records are read, and CNAME chains are
//! followed at most [`MAX_CHAIN`] names deep. Nothing allocates: names are decoded into
//! fixed-size buffers on the stack.

use std::net::Ipv4Addr;

pub(crate) const HEADER_LEN: usize = 12;
/// Longest name on the wire, counting length bytes and the root label (RFC 1035 3.1).
pub(crate) const MAX_NAME: usize = 255;
pub(crate) const MAX_POINTER_HOPS: usize = 16;
pub(crate) const MAX_QUESTIONS: usize = 4;
pub(crate) const MAX_ANSWERS: usize = 64;
/// Names in a chain: the question and the CNAME targets that follow from it.
pub(crate) const MAX_CHAIN: usize = 8;

const FLAG_RESPONSE: u16 = 0x8000;
const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const CLASS_IN: u16 = 1;

/// The message is not a well-formed DNS response (within the bounds above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

/// A decoded name in wire form, labels lowered to ASCII lower case, without the root label.
#[derive(Clone, Copy)]
pub(crate) struct Name {
    len: u8,
    buf: [u8; MAX_NAME],
}

impl Name {
    pub(crate) const fn new() -> Self {
        Name {
            len: 0,
            buf: [0; MAX_NAME],
        }
    }

    pub(crate) fn wire(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        self.wire() == other.wire()
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Name({:?})", String::from_utf8_lossy(self.wire()))
    }
}

fn be16(msg: &[u8], at: usize) -> Result<u16, Malformed> {
    match msg.get(at..at + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(Malformed),
    }
}

/// Decodes the name at `start` into `out`; returns the offset just past it where it appears
/// (past its first compression pointer, if any).
pub(crate) fn read_name(msg: &[u8], start: usize, out: &mut Name) -> Result<usize, Malformed> {
    out.len = 0;
    let mut pos = start;
    // Where the current run of labels began: a pointer must go before it.
    let mut run_start = start;
    let mut end = None;
    let mut hops = 0;
    loop {
        let len = *msg.get(pos).ok_or(Malformed)?;
        match len & 0xc0 {
            0x00 if len == 0 => return Ok(end.unwrap_or(pos + 1)),
            0x00 => {
                let len = usize::from(len);
                let label = msg.get(pos + 1..pos + 1 + len).ok_or(Malformed)?;
                let at = usize::from(out.len);
                // This label, its length byte and the root label still to come.
                if at + 1 + len + 1 > MAX_NAME {
                    return Err(Malformed);
                }
                out.buf[at] = len as u8;
                for (dst, src) in out.buf[at + 1..at + 1 + len].iter_mut().zip(label) {
                    *dst = src.to_ascii_lowercase();
                }
                out.len = (at + 1 + len) as u8;
                pos += 1 + len;
            }
            0xc0 => {
                let target = usize::from(len & 0x3f) << 8 | usize::from(be16(msg, pos)? & 0xff);
                hops += 1;
                if target >= run_start || hops > MAX_POINTER_HOPS {
                    return Err(Malformed);
                }
                end.get_or_insert(pos + 2);
                pos = target;
                run_start = target;
            }
            // 0x40 and 0x80: extended and reserved label types (RFC 6891), not in answers.
            _ => return Err(Malformed),
        }
    }
}

/// Where an answer record is, as read by [`parse`].
#[derive(Debug, Clone, Copy, Default)]
struct Record {
    owner: usize,
    rtype: u16,
    class: u16,
    ttl: u32,
    rdata: usize,
    rdlen: usize,
}

/// A response that parsed: its question and the answer records looked at.
pub(crate) struct Response<'a> {
    msg: &'a [u8],
    /// Exactly one question, a standard query, no error: what may be learned from.
    pub learnable: bool,
    records: [Record; MAX_ANSWERS],
    count: usize,
}

/// The names a question resolves through: the question itself, then the CNAME targets that
/// follow from it inside the same message.
pub(crate) struct Chain {
    names: [Name; MAX_CHAIN],
    len: usize,
}

impl Chain {
    pub(crate) fn question(&self) -> &Name {
        &self.names[0]
    }

    pub(crate) fn names(&self) -> &[Name] {
        &self.names[..self.len]
    }

    fn contains(&self, name: &Name) -> bool {
        self.names().contains(name)
    }
}

/// Reads a DNS response. `seen` is called with every name read (questions, owners of answer
/// records, CNAME targets) as it is read, so a caller learns the names before a later part of
/// the message turns out malformed.
pub(crate) fn parse<'a>(
    msg: &'a [u8],
    seen: &mut dyn FnMut(&Name),
) -> Result<Response<'a>, Malformed> {
    if msg.len() < HEADER_LEN {
        return Err(Malformed);
    }
    let flags = be16(msg, 2)?;
    if flags & FLAG_RESPONSE == 0 {
        return Err(Malformed);
    }
    let questions = usize::from(be16(msg, 4)?);
    let answers = usize::from(be16(msg, 6)?);
    let opcode = (flags >> 11) & 0xf;
    let rcode = flags & 0xf;

    let mut name = Name::new();
    let mut pos = HEADER_LEN;
    for _ in 0..questions.min(MAX_QUESTIONS) {
        pos = read_name(msg, pos, &mut name)?;
        seen(&name);
        pos += 4; // QTYPE, QCLASS
        if pos > msg.len() {
            return Err(Malformed);
        }
    }
    if questions > MAX_QUESTIONS {
        return Err(Malformed);
    }

    let mut response = Response {
        msg,
        learnable: questions == 1 && opcode == 0 && rcode == 0,
        records: [Record::default(); MAX_ANSWERS],
        count: 0,
    };
    for _ in 0..answers.min(MAX_ANSWERS) {
        let owner = pos;
        pos = read_name(msg, pos, &mut name)?;
        seen(&name);
        let fixed = msg.get(pos..pos + 10).ok_or(Malformed)?;
        let record = Record {
            owner,
            rtype: u16::from_be_bytes([fixed[0], fixed[1]]),
            class: u16::from_be_bytes([fixed[2], fixed[3]]),
            ttl: u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]),
            rdata: pos + 10,
            rdlen: usize::from(u16::from_be_bytes([fixed[8], fixed[9]])),
        };
        let end = record.rdata + record.rdlen;
        if end > msg.len() {
            return Err(Malformed);
        }
        if record.class == CLASS_IN {
            match record.rtype {
                TYPE_A if record.rdlen != 4 => return Err(Malformed),
                TYPE_CNAME => {
                    if read_name(msg, record.rdata, &mut name)? != end {
                        return Err(Malformed);
                    }
                    seen(&name);
                }
                _ => {}
            }
        }
        response.records[response.count] = record;
        response.count += 1;
        pos = end;
    }
    Ok(response)
}

impl Response<'_> {
    fn records(&self) -> &[Record] {
        &self.records[..self.count]
    }

    /// The question and the CNAME targets reachable from it. Only meaningful when
    /// [`Response::learnable`] (one question); otherwise the first question heads the chain.
    pub(crate) fn chain(&self) -> Chain {
        let mut chain = Chain {
            names: [Name::new(); MAX_CHAIN],
            len: 1,
        };
        // The question parsed already, so this cannot fail; an empty name if it somehow did.
        let _ = read_name(self.msg, HEADER_LEN, &mut chain.names[0]);
        let mut owner = Name::new();
        let mut target = Name::new();
        // Each round adds at least one name or stops, whatever order the records come in.
        while chain.len < MAX_CHAIN {
            let mut grown = false;
            for r in self.records() {
                if r.rtype != TYPE_CNAME || r.class != CLASS_IN || chain.len == MAX_CHAIN {
                    continue;
                }
                if read_name(self.msg, r.owner, &mut owner).is_err() || !chain.contains(&owner) {
                    continue;
                }
                if read_name(self.msg, r.rdata, &mut target).is_ok() && !chain.contains(&target) {
                    chain.names[chain.len] = target;
                    chain.len += 1;
                    grown = true;
                }
            }
            if !grown {
                break;
            }
        }
        chain
    }

    /// Calls `f` with the address and TTL of every A record (class IN) whose owner is in
    /// `chain`.
    pub(crate) fn addresses(&self, chain: &Chain, mut f: impl FnMut(Ipv4Addr, u32)) {
        let mut owner = Name::new();
        for r in self.records() {
            if r.rtype != TYPE_A || r.class != CLASS_IN {
                continue;
            }
            if read_name(self.msg, r.owner, &mut owner).is_ok() && chain.contains(&owner) {
                let a = &self.msg[r.rdata..r.rdata + 4];
                f(Ipv4Addr::new(a[0], a[1], a[2], a[3]), r.ttl);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds DNS messages for tests; names are dotted strings or raw wire bytes.
    pub(crate) struct Msg(pub Vec<u8>);

    pub(crate) fn wire(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in name.split('.').filter(|l| !l.is_empty()) {
            out.push(label.len() as u8);
            out.extend(label.as_bytes());
        }
        out.push(0);
        out
    }

    impl Msg {
        /// A response header (id 0x1234, QR RD RA, NOERROR) and one question of type A.
        pub(crate) fn response(question: &str, answers: u16) -> Msg {
            let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1];
            m.extend(answers.to_be_bytes());
            m.extend([0, 0, 0, 0]);
            m.extend(wire(question));
            m.extend([0, 1, 0, 1]);
            Msg(m)
        }

        /// An answer record with `owner` given as wire bytes (a name or a pointer).
        pub(crate) fn record(mut self, owner: &[u8], rtype: u16, ttl: u32, rdata: &[u8]) -> Msg {
            self.0.extend(owner);
            self.0.extend(rtype.to_be_bytes());
            self.0.extend(CLASS_IN.to_be_bytes());
            self.0.extend(ttl.to_be_bytes());
            self.0.extend((rdata.len() as u16).to_be_bytes());
            self.0.extend(rdata);
            self
        }

        pub(crate) fn a(self, owner: &[u8], ttl: u32, addr: [u8; 4]) -> Msg {
            self.record(owner, TYPE_A, ttl, &addr)
        }

        pub(crate) fn cname(self, owner: &[u8], ttl: u32, target: &[u8]) -> Msg {
            self.record(owner, TYPE_CNAME, ttl, target)
        }
    }

    /// A pointer to the question name.
    pub(crate) const QNAME: [u8; 2] = [0xc0, 12];

    fn names_seen(msg: &[u8]) -> (Result<bool, Malformed>, Vec<String>) {
        let mut seen = Vec::new();
        let r = parse(msg, &mut |n: &Name| {
            seen.push(String::from_utf8_lossy(n.wire()).into_owned())
        });
        (r.map(|r| r.learnable), seen)
    }

    fn learned(msg: &[u8]) -> Vec<(Ipv4Addr, u32, Vec<String>)> {
        let r = parse(msg, &mut |_| {}).unwrap();
        let chain = r.chain();
        let names: Vec<String> = chain
            .names()
            .iter()
            .map(|n| String::from_utf8_lossy(n.wire()).into_owned())
            .collect();
        let mut out = Vec::new();
        r.addresses(&chain, |a, ttl| out.push((a, ttl, names.clone())));
        out
    }

    /// A response as a resolver sends it (the shape of `dig www.example.com` through a
    /// recursive resolver): owner names compressed, the CNAME target compressed against the
    /// question's suffix, an A record for an unrelated name, and an EDNS OPT record in the
    /// additional section.
    #[rustfmt::skip]
    pub(crate) const EXAMPLE_RESPONSE: &[u8] = &[
        0xab, 0xcd, 0x81, 0x80, 0x00, 0x01, 0x00, 0x03, 0x00, 0x00, 0x00, 0x01,
        // www.example.com A IN (offset 12)
        3, b'w', b'w', b'w', 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3, b'c', b'o', b'm', 0,
        0x00, 0x01, 0x00, 0x01,
        // www.example.com CNAME cdn.example.com, TTL 3600 (target: "cdn" + pointer to 16)
        0xc0, 0x0c, 0x00, 0x05, 0x00, 0x01, 0x00, 0x00, 0x0e, 0x10, 0x00, 0x06,
        3, b'c', b'd', b'n', 0xc0, 0x10,
        // cdn.example.com A 93.184.216.34, TTL 60 (owner: pointer to the CNAME target at 45)
        0xc0, 0x2d, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x3c, 0x00, 0x04,
        93, 184, 216, 34,
        // unrelat.example.com A 6.6.6.6: not attributed to the question.
        7, b'u', b'n', b'r', b'e', b'l', b'a', b't', 0xc0, 0x10,
        0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x3c, 0x00, 0x04, 6, 6, 6, 6,
        // OPT pseudo-record (additional section, never read)
        0x00, 0x00, 0x29, 0x04, 0xd0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn reads_a_real_shaped_response() {
        let msg = EXAMPLE_RESPONSE;
        let (learnable, seen) = names_seen(msg);
        assert_eq!(learnable, Ok(true));
        assert_eq!(
            seen,
            [
                "\x03www\x07example\x03com",
                "\x03www\x07example\x03com",
                "\x03cdn\x07example\x03com",
                "\x03cdn\x07example\x03com",
                "\x07unrelat\x07example\x03com",
            ]
        );
        assert_eq!(
            learned(msg),
            [(
                Ipv4Addr::new(93, 184, 216, 34),
                60,
                vec![
                    "\x03www\x07example\x03com".to_owned(),
                    "\x03cdn\x07example\x03com".to_owned()
                ]
            )]
        );
    }

    #[test]
    fn cname_chain_in_any_order_and_bounded() {
        // q -> a -> b, records listed backwards, A for b.
        let msg = Msg::response("Q.test", 3)
            .a(&wire("b.test"), 30, [1, 1, 1, 1])
            .cname(&wire("a.test"), 30, &wire("B.test"))
            .cname(&QNAME, 30, &wire("a.test"));
        let got = learned(&msg.0);
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].2,
            ["\x01q\x04test", "\x01a\x04test", "\x01b\x04test"]
        );

        // A chain longer than MAX_CHAIN: the tail is not attributed.
        let mut msg = Msg::response("n0.test", MAX_CHAIN as u16 + 1);
        for i in 0..MAX_CHAIN {
            msg = msg.cname(
                &wire(&format!("n{i}.test")),
                30,
                &wire(&format!("n{}.test", i + 1)),
            );
        }
        msg = msg.a(&wire(&format!("n{MAX_CHAIN}.test")), 30, [2, 2, 2, 2]);
        assert!(learned(&msg.0).is_empty());

        // CNAME loops end.
        let msg = Msg::response("x.test", 3)
            .cname(&QNAME, 30, &wire("y.test"))
            .cname(&wire("y.test"), 30, &wire("x.test"))
            .a(&wire("y.test"), 30, [3, 3, 3, 3]);
        assert_eq!(learned(&msg.0).len(), 1);
    }

    #[test]
    fn forward_pointer_and_loops_are_refused() {
        // Owner is a pointer to itself (offset of the record).
        let mut msg = Msg::response("a.test", 1);
        let at = msg.0.len() as u8;
        msg = msg.a(&[0xc0, at], 30, [1, 2, 3, 4]);
        assert_eq!(names_seen(&msg.0).0, Err(Malformed));

        // Forward pointer: the owner points into the record's own rdata.
        let mut msg = Msg::response("a.test", 1);
        let at = msg.0.len() as u8;
        msg = msg.record(&[0xc0, at + 12], TYPE_CNAME, 30, &wire("b.test"));
        assert_eq!(names_seen(&msg.0).0, Err(Malformed));

        // A label then a pointer back to that label: backwards, yet a loop. The pointer must go
        // before where its run began, so this ends at once.
        let mut msg = Msg::response("a.test", 1);
        let at = msg.0.len() as u8;
        msg = msg.a(&[1, b'x', 0xc0, at], 30, [1, 2, 3, 4]);
        assert_eq!(names_seen(&msg.0).0, Err(Malformed));

        // Two names pointing at each other.
        let mut m = Msg::response("a.test", 2).0;
        let first = m.len() as u8;
        m.extend([1, b'x', 0xc0, first + 18]); // pointer forward to the second owner
        m.extend([0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 1, 2, 3, 4]);
        m.extend([1, b'y', 0xc0, first]);
        m.extend([0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 1, 2, 3, 4]);
        assert_eq!(names_seen(&m).0, Err(Malformed));

        // Pointer into the header (offset < 12): backwards and legal to follow, then garbage.
        let msg = Msg::response("a.test", 1).a(&[0xc0, 0x02], 30, [1, 2, 3, 4]);
        let _ = names_seen(&msg.0); // must not panic; outcome depends on header bytes
    }

    #[test]
    fn pointer_hop_limit() {
        // A chain of pointers each one back from the previous: longer than the hop limit.
        let mut m = Msg::response("a.test", 1).0;
        let base = m.len();
        m.push(0); // root at base
        for i in 0..=MAX_POINTER_HOPS {
            let target = if i == 0 { base } else { base + 1 + 2 * (i - 1) };
            m.extend([0xc0 | (target >> 8) as u8, target as u8]);
        }
        let mut n = Name::new();
        let last = m.len() - 2;
        assert_eq!(read_name(&m, last, &mut n), Err(Malformed));
        let shorter = last - 2;
        assert_eq!(read_name(&m, shorter, &mut n), Ok(shorter + 2));
        assert_eq!(n.wire(), b"");
    }

    #[test]
    fn name_length_limit() {
        let mut m = vec![0u8; HEADER_LEN];
        // 4 labels of 63: 4 * 64 + 1 = 257 bytes on the wire, too long.
        for _ in 0..4 {
            m.push(63);
            m.extend([b'a'; 63]);
        }
        m.push(0);
        let mut n = Name::new();
        assert_eq!(read_name(&m, HEADER_LEN, &mut n), Err(Malformed));
        // 3 labels of 63 and one of 61: exactly 255.
        let mut m = vec![0u8; HEADER_LEN];
        for len in [63, 63, 63, 61] {
            m.push(len);
            m.extend(vec![b'A'; usize::from(len)]);
        }
        m.push(0);
        assert_eq!(read_name(&m, HEADER_LEN, &mut n), Ok(m.len()));
        assert_eq!(n.wire().len(), 254);
        assert!(n.wire()[1..64].iter().all(|&b| b == b'a'), "lower-cased");
    }

    #[test]
    fn hostile_headers() {
        assert_eq!(names_seen(&[0; 11]).0, Err(Malformed));
        // A query (QR clear) is not a response.
        let mut q = Msg::response("a.test", 0).0;
        q[2] &= 0x7f;
        assert_eq!(names_seen(&q).0, Err(Malformed));
        // Counts far past the message.
        let mut m = Msg::response("a.test", 0).0;
        m[6..8].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(names_seen(&m).0, Err(Malformed));
        // More answers than are read: the first MAX_ANSWERS count, the rest are ignored.
        let mut msg = Msg::response("a.test", u16::MAX);
        for i in 0..MAX_ANSWERS as u8 + 10 {
            msg = msg.a(&QNAME, 30, [10, 0, 0, i]);
        }
        assert_eq!(learned(&msg.0).len(), MAX_ANSWERS);
        // Extended label type.
        let msg = Msg::response("a.test", 1).a(&[0x41, 0], 30, [1, 2, 3, 4]);
        assert_eq!(names_seen(&msg.0).0, Err(Malformed));
        // A record of the wrong size; CNAME whose name overruns its rdata.
        let msg = Msg::response("a.test", 1).record(&QNAME, TYPE_A, 30, &[1, 2, 3]);
        assert_eq!(names_seen(&msg.0).0, Err(Malformed));
        let mut msg = Msg::response("a.test", 1).cname(&QNAME, 30, &wire("b.test"));
        let rdlen_at = msg.0.len() - wire("b.test").len() - 2;
        msg.0[rdlen_at + 1] -= 1; // the name ends one byte past the record's data
        assert_eq!(names_seen(&msg.0).0, Err(Malformed));
        // Not learnable: two questions, an error rcode, another opcode.
        let mut two = Msg::response("a.test", 0).0;
        two[5] = 2;
        two.extend(wire("b.test"));
        two.extend([0, 1, 0, 1]);
        assert_eq!(names_seen(&two).0, Ok(false));
        let mut nx = Msg::response("a.test", 0).0;
        nx[3] |= 3;
        assert_eq!(names_seen(&nx).0, Ok(false));
        let mut notify = Msg::response("a.test", 0).0;
        notify[2] |= 4 << 3;
        assert_eq!(names_seen(&notify).0, Ok(false));
    }
}
