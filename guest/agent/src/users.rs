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

fn lines(data: &[u8]) -> Vec<Vec<Vec<u8>>> {
    data.split(|&b| b == b'\n')
        .filter(|line| !line.is_empty() && line[0] != b'#')
        .map(|line| line.split(|&b| b == b':').map(<[u8]>::to_vec).collect())
        .collect()
}

fn passwd_entries(data: &[u8]) -> Vec<Passwd> {
    lines(data)
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
fn group_entries(data: &[u8]) -> Vec<(Vec<u8>, u32, Vec<Vec<u8>>)> {
    lines(data)
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
    let passwd = std::fs::read("/etc/passwd").unwrap_or_default();
    let group = std::fs::read("/etc/group").unwrap_or_default();
    resolve_in(spec, &passwd, &group)
}

/// [`resolve`] against the given contents of /etc/passwd and /etc/group.
pub fn resolve_in(spec: &[u8], passwd_file: &[u8], group_file: &[u8]) -> Result<Identity, String> {
    let shown = String::from_utf8_lossy(spec).into_owned();
    let (user, group) = match spec.iter().position(|&b| b == b':') {
        Some(at) => (&spec[..at], Some(&spec[at + 1..])),
        None => (spec, None),
    };
    if user.is_empty() {
        return Err(format!("invalid user {shown:?}"));
    }
    let passwd = passwd_entries(passwd_file);
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
    let groups_db = group_entries(group_file);
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

#[cfg(test)]
mod tests {
    use super::resolve_in;

    const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\n# comment\nbroken line\n\
app:x:1000:1000::/home/app:/bin/sh\nnohome:x:1001:1001:::/bin/sh\n";
    const GROUP: &[u8] =
        b"root:x:0:\nwheel:x:10:app,other\napp:x:1000:\ndocker:x:999:app\nstaff:x:50:\n";

    fn ids(spec: &str) -> Result<(u32, u32, Vec<u32>, String), String> {
        let id = resolve_in(spec.as_bytes(), PASSWD, GROUP)?;
        Ok((
            id.uid,
            id.gid,
            id.groups,
            String::from_utf8(id.home).unwrap(),
        ))
    }

    #[test]
    fn names_and_numbers() {
        assert_eq!(
            ids("app").unwrap(),
            (1000, 1000, vec![1000, 10, 999], "/home/app".into())
        );
        assert_eq!(
            ids("1000").unwrap(),
            (1000, 1000, vec![1000, 10, 999], "/home/app".into())
        );
        assert_eq!(
            ids("app:staff").unwrap(),
            (1000, 50, vec![50, 10, 999], "/home/app".into())
        );
        assert_eq!(ids("app:7").unwrap().1, 7);
        assert_eq!(ids("root").unwrap(), (0, 0, vec![0], "/root".into()));
        assert_eq!(ids("nohome").unwrap().3, "/");
    }

    #[test]
    fn unknown_numeric_uid_gets_gid_zero() {
        assert_eq!(ids("4242").unwrap(), (4242, 0, vec![0], "/".into()));
        assert_eq!(
            ids("4242:4343").unwrap(),
            (4242, 4343, vec![4343], "/".into())
        );
    }

    #[test]
    fn errors() {
        assert_eq!(
            ids("ghost").unwrap_err(),
            "user ghost not found in /etc/passwd"
        );
        assert_eq!(
            ids("app:ghosts").unwrap_err(),
            "group ghosts not found in /etc/group"
        );
        assert_eq!(ids(":1").unwrap_err(), "invalid user \":1\"");
        assert_eq!(ids("app:").unwrap_err(), "invalid user \"app:\"");
        assert!(ids("99999999999").is_err());
    }
}
