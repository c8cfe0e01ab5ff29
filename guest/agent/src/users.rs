//! User and group lookup from /etc/passwd and /etc/group (no NSS: the agent is a static binary).

pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: Vec<u8>,
}

struct Passwd {
    name: Vec<u8>,
    uid: u32,
    gid: u32,
    home: Vec<u8>,
}

fn parse_id(text: &[u8]) -> Option<u32> {
    if text.is_empty() || text.len() > 10 || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

fn lines(path: &str) -> Vec<Vec<Vec<u8>>> {
    let Ok(data) = std::fs::read(path) else {
        return Vec::new();
    };
    data.split(|&b| b == b'\n')
        .filter(|line| !line.is_empty() && line[0] != b'#')
        .map(|line| line.split(|&b| b == b':').map(<[u8]>::to_vec).collect())
        .collect()
}

fn passwd_entries() -> Vec<Passwd> {
    lines("/etc/passwd")
        .into_iter()
        .filter(|f| f.len() >= 7)
        .filter_map(|f| {
            Some(Passwd {
                name: f[0].clone(),
                uid: parse_id(&f[2])?,
                gid: parse_id(&f[3])?,
                home: f[5].clone(),
            })
        })
        .collect()
}

/// `(name, gid, members)` of every group.
fn group_entries() -> Vec<(Vec<u8>, u32, Vec<Vec<u8>>)> {
    lines("/etc/group")
        .into_iter()
        .filter(|f| f.len() >= 4)
        .filter_map(|f| {
            let members = f[3]
                .split(|&b| b == b',')
                .filter(|m| !m.is_empty())
                .map(<[u8]>::to_vec)
                .collect();
            Some((f[0].clone(), parse_id(&f[2])?, members))
        })
        .collect()
}

/// Resolves `user`, `uid`, `user:group`, `uid:gid` (and mixtures) like a container runtime does:
/// a numeric uid without a passwd entry gets gid 0 unless a group is given; supplementary groups are
/// the groups that list the user's name, plus the primary group.
pub fn resolve(spec: &[u8]) -> Result<Identity, String> {
    let shown = String::from_utf8_lossy(spec).into_owned();
    let (user, group) = match spec.iter().position(|&b| b == b':') {
        Some(at) => (&spec[..at], Some(&spec[at + 1..])),
        None => (spec, None),
    };
    if user.is_empty() {
        return Err(format!("invalid user {shown:?}"));
    }
    let passwd = passwd_entries();
    let entry = match parse_id(user) {
        Some(uid) => passwd.into_iter().find(|p| p.uid == uid).or(Some(Passwd {
            name: Vec::new(),
            uid,
            gid: 0,
            home: b"/".to_vec(),
        })),
        None => passwd.into_iter().find(|p| p.name == user),
    };
    let Some(entry) = entry else {
        return Err(format!(
            "user {} not found in /etc/passwd",
            String::from_utf8_lossy(user)
        ));
    };
    let groups_db = group_entries();
    let gid = match group {
        None => entry.gid,
        Some([]) => return Err(format!("invalid user {shown:?}")),
        Some(g) => match parse_id(g) {
            Some(gid) => gid,
            None => match groups_db.iter().find(|(name, _, _)| name == g) {
                Some((_, gid, _)) => *gid,
                None => {
                    return Err(format!(
                        "group {} not found in /etc/group",
                        String::from_utf8_lossy(g)
                    ))
                }
            },
        },
    };
    let mut groups = vec![gid];
    if !entry.name.is_empty() {
        for (_, g, members) in &groups_db {
            if members.contains(&entry.name) && !groups.contains(g) {
                groups.push(*g);
            }
        }
    }
    let home = if entry.home.is_empty() {
        b"/".to_vec()
    } else {
        entry.home
    };
    Ok(Identity {
        uid: entry.uid,
        gid,
        groups,
        home,
    })
}
