//! The rolling-restart plan: which instance slots to roll, remove and add, in order, for a
//! change from one set of counts to another.

use protocol::{Counts, Pool, RestartArgs};

/// One step of a rolling restart, on the slot `pool`/`index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Replace the slot's instance. `surge`: start and ready the replacement before draining
    /// the old one, because it is the pool's only instance.
    Roll { pool: Pool, index: u32, surge: bool },
    /// Drain and stop the slot's instance without replacement (scaling down).
    Remove { pool: Pool, index: u32 },
    /// Start an instance in a new slot (scaling up).
    Add { pool: Pool, index: u32 },
}

pub fn count(counts: Counts, pool: Pool) -> u32 {
    match pool {
        Pool::Https => counts.https,
        Pool::Http => counts.http,
        Pool::Root => u32::from(counts.root),
    }
}

pub fn with_count(mut counts: Counts, pool: Pool, n: u32) -> Counts {
    match pool {
        Pool::Https => counts.https = n,
        Pool::Http => counts.http = n,
        Pool::Root => counts.root = n > 0,
    }
    counts
}

/// The counts a restart asks for: each argument given replaces the current value.
pub fn target_counts(current: Counts, args: &RestartArgs) -> Counts {
    Counts {
        https: args.ssl.unwrap_or(current.https),
        http: args.http.unwrap_or(current.http),
        root: args.root.unwrap_or(current.root),
    }
}

/// HTTPS pool first, then HTTP, then root. Within a pool: roll the slots that stay, then stop
/// the last ones (highest index first) when shrinking, then start the extra ones when growing.
/// A pool of one is rolled surge-first so it is never empty.
pub fn restart_plan(old: Counts, new: Counts) -> Vec<Step> {
    let mut steps = Vec::new();
    for pool in Pool::ALL {
        let (from, to) = (count(old, pool), count(new, pool));
        let keep = from.min(to);
        let surge = from == 1;
        steps.extend((0..keep).map(|index| Step::Roll { pool, index, surge }));
        steps.extend((to..from).rev().map(|index| Step::Remove { pool, index }));
        steps.extend((from..to).map(|index| Step::Add { pool, index }));
    }
    steps
}

/// `2 https, 1 http, root on`
pub fn describe(counts: Counts) -> String {
    format!(
        "{} https, {} http, root {}",
        counts.https,
        counts.http,
        if counts.root { "on" } else { "off" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use Step::*;

    fn c(https: u32, http: u32, root: bool) -> Counts {
        Counts { https, http, root }
    }

    #[test]
    fn same_counts_roll_every_slot_in_pool_order() {
        let plan = restart_plan(c(2, 2, true), c(2, 2, true));
        assert_eq!(
            plan,
            [
                Roll {
                    pool: Pool::Https,
                    index: 0,
                    surge: false
                },
                Roll {
                    pool: Pool::Https,
                    index: 1,
                    surge: false
                },
                Roll {
                    pool: Pool::Http,
                    index: 0,
                    surge: false
                },
                Roll {
                    pool: Pool::Http,
                    index: 1,
                    surge: false
                },
                Roll {
                    pool: Pool::Root,
                    index: 0,
                    surge: true
                },
            ]
        );
    }

    #[test]
    fn pools_of_one_are_rolled_surge_first() {
        let plan = restart_plan(c(1, 1, false), c(1, 3, false));
        assert_eq!(
            plan,
            [
                Roll {
                    pool: Pool::Https,
                    index: 0,
                    surge: true
                },
                Roll {
                    pool: Pool::Http,
                    index: 0,
                    surge: true
                },
                Add {
                    pool: Pool::Http,
                    index: 1
                },
                Add {
                    pool: Pool::Http,
                    index: 2
                },
            ]
        );
    }

    #[test]
    fn shrinking_stops_the_last_ones_after_the_restart() {
        let plan = restart_plan(c(3, 1, true), c(1, 0, false));
        assert_eq!(
            plan,
            [
                Roll {
                    pool: Pool::Https,
                    index: 0,
                    surge: false
                },
                Remove {
                    pool: Pool::Https,
                    index: 2
                },
                Remove {
                    pool: Pool::Https,
                    index: 1
                },
                Remove {
                    pool: Pool::Http,
                    index: 0
                },
                Remove {
                    pool: Pool::Root,
                    index: 0
                },
            ]
        );
    }

    #[test]
    fn growing_from_zero_only_adds() {
        let plan = restart_plan(c(0, 0, false), c(1, 0, true));
        assert_eq!(
            plan,
            [
                Add {
                    pool: Pool::Https,
                    index: 0
                },
                Add {
                    pool: Pool::Root,
                    index: 0
                }
            ]
        );
    }

    #[test]
    fn target_counts_take_only_given_arguments() {
        let args = RestartArgs {
            ssl: None,
            http: Some(4),
            root: Some(false),
        };
        assert_eq!(target_counts(c(2, 2, true), &args), c(2, 4, false));
        assert_eq!(with_count(c(2, 2, false), Pool::Root, 1), c(2, 2, true));
        assert_eq!(describe(c(2, 1, false)), "2 https, 1 http, root off");
    }
}
