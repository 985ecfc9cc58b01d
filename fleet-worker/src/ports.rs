//! Port allocation: a port from the configured range that no instance holds and that can be
//! bound on 127.0.0.1 right now.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};

/// Whether nothing listens on 127.0.0.1:`port`: we can bind it this moment. The test listener
/// is dropped before this returns.
pub fn is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// The inclusive range instances get their ports from. Allocation walks it round-robin from
/// a cursor, so a replacement gets a fresh port rather than the one its predecessor just left.
#[derive(Debug, Clone)]
pub struct PortRange {
    min: u16,
    max: u16,
    cursor: u16,
}

impl PortRange {
    /// `None` when the range is empty (`min > max`) or starts at port 0.
    pub fn new(min: u16, max: u16) -> Option<Self> {
        (min > 0 && min <= max).then_some(PortRange {
            min,
            max,
            cursor: min,
        })
    }

    pub fn min(&self) -> u16 {
        self.min
    }

    pub fn max(&self) -> u16 {
        self.max
    }

    /// The next port after the cursor that is not in `in_use` and for which `is_free` says yes.
    pub fn pick(
        &mut self,
        in_use: &HashSet<u16>,
        mut is_free: impl FnMut(u16) -> bool,
    ) -> Option<u16> {
        let len = u32::from(self.max - self.min) + 1;
        let start = u32::from(self.cursor - self.min);
        for step in 0..len {
            let offset = (start + step) % len;
            // `offset < len`, so the sum stays within [min, max].
            let port = self.min + offset as u16;
            if in_use.contains(&port) || !is_free(port) {
                continue;
            }
            let next = (offset + 1) % len;
            self.cursor = self.min + next as u16;
            return Some(port);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_zero_ranges_are_rejected() {
        assert!(PortRange::new(10, 9).is_none());
        assert!(PortRange::new(0, 9).is_none());
        assert!(PortRange::new(5, 5).is_some());
    }

    #[test]
    fn round_robin_skips_used_and_busy_ports() {
        let mut range = PortRange::new(3000, 3004).unwrap();
        let mut used = HashSet::new();
        assert_eq!(range.pick(&used, |_| true), Some(3000));
        used.insert(3000);
        assert_eq!(range.pick(&used, |p| p != 3001), Some(3002));
        used.insert(3002);
        // 3000 is released; the cursor still moves on to a fresh port first.
        used.remove(&3000);
        assert_eq!(range.pick(&used, |_| true), Some(3003));
        assert_eq!(range.pick(&used, |_| true), Some(3004));
        assert_eq!(range.pick(&used, |_| true), Some(3000));
    }

    #[test]
    fn never_hands_out_a_port_twice_and_reports_exhaustion() {
        let mut range = PortRange::new(4000, 4002).unwrap();
        let mut used = HashSet::new();
        for _ in 0..3 {
            let port = range.pick(&used, |_| true).unwrap();
            assert!(used.insert(port), "port {port} handed out twice");
        }
        assert_eq!(range.pick(&used, |_| true), None);
        let mut full = PortRange::new(65535, 65535).unwrap();
        assert_eq!(full.pick(&HashSet::new(), |_| true), Some(65535));
        assert_eq!(full.pick(&HashSet::new(), |_| true), Some(65535));
    }

    #[test]
    fn is_free_sees_a_listener() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(!is_free(port));
        drop(listener);
        assert!(is_free(port));
    }
}
