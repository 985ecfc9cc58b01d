//! Who may use the control socket: uid 0, our own uid, or a member of the control group
//! (primary group or listed in the group database). Decided from SO_PEERCRED.

use nix::unistd::{Gid, Group, Uid, User};

/// The peer of a control connection, as the kernel reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// The group database as the access check needs it; [`SystemDb`] asks NSS.
pub trait GroupDb {
    /// Login name and primary gid of `uid`.
    fn user(&self, uid: u32) -> Option<(String, u32)>;
    /// Name and member list of `gid`.
    fn group(&self, gid: u32) -> Option<(String, Vec<String>)>;
}

pub struct SystemDb;

impl GroupDb for SystemDb {
    fn user(&self, uid: u32) -> Option<(String, u32)> {
        match User::from_uid(Uid::from_raw(uid)) {
            Ok(Some(user)) => Some((user.name, user.gid.as_raw())),
            _ => None,
        }
    }

    fn group(&self, gid: u32) -> Option<(String, Vec<String>)> {
        match Group::from_gid(Gid::from_raw(gid)) {
            Ok(Some(group)) => Some((group.name, group.mem)),
            _ => None,
        }
    }
}

/// `Ok(())` when `peer` may use the control socket, else the refusal text for the client.
pub fn check(
    peer: Peer,
    our_uid: u32,
    control_gid: Option<u32>,
    db: &dyn GroupDb,
) -> Result<(), String> {
    if peer.uid == 0 || peer.uid == our_uid {
        return Ok(());
    }
    let Some(gid) = control_gid else {
        return Err(format!(
            "permission denied: uid {} is neither root nor the fleet user (uid {our_uid})",
            peer.uid
        ));
    };
    if peer.gid == gid {
        return Ok(());
    }
    let user = db.user(peer.uid);
    if user.as_ref().is_some_and(|(_, primary)| *primary == gid) {
        return Ok(());
    }
    let group = db.group(gid);
    if let (Some((name, _)), Some((_, members))) = (&user, &group) {
        if members.iter().any(|m| m == name) {
            return Ok(());
        }
    }
    let group_name = group
        .map(|(name, _)| name)
        .unwrap_or_else(|| gid.to_string());
    Err(format!(
        "permission denied: uid {} is not in group {group_name}",
        peer.uid
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeDb;

    impl GroupDb for FakeDb {
        fn user(&self, uid: u32) -> Option<(String, u32)> {
            match uid {
                1001 => Some(("alice".into(), 1001)),
                1002 => Some(("bob".into(), 500)),
                1003 => Some(("carol".into(), 1003)),
                _ => None,
            }
        }

        fn group(&self, gid: u32) -> Option<(String, Vec<String>)> {
            (gid == 500).then(|| ("overwatch".into(), vec!["alice".into()]))
        }
    }

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            uid,
            gid,
            pid: None,
        }
    }

    #[test]
    fn root_and_our_uid_are_always_allowed() {
        assert_eq!(check(peer(0, 0), 999, None, &FakeDb), Ok(()));
        assert_eq!(check(peer(999, 999), 999, None, &FakeDb), Ok(()));
        assert_eq!(check(peer(999, 5), 999, Some(500), &FakeDb), Ok(()));
    }

    #[test]
    fn group_members_primary_or_listed_are_allowed() {
        // listed in the group's member list
        assert_eq!(check(peer(1001, 1001), 999, Some(500), &FakeDb), Ok(()));
        // primary group in the user database
        assert_eq!(check(peer(1002, 1002), 999, Some(500), &FakeDb), Ok(()));
        // effective gid of the peer process
        assert_eq!(check(peer(4242, 500), 999, Some(500), &FakeDb), Ok(()));
    }

    #[test]
    fn others_are_refused_with_the_group_name() {
        assert_eq!(
            check(peer(1003, 1003), 999, Some(500), &FakeDb),
            Err("permission denied: uid 1003 is not in group overwatch".into())
        );
        assert_eq!(
            check(peer(1003, 1003), 999, Some(77), &FakeDb),
            Err("permission denied: uid 1003 is not in group 77".into())
        );
        assert!(check(peer(1001, 500), 999, None, &FakeDb).is_err());
    }
}
