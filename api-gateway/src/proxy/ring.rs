//! The consistent-hash ring that makes routing sticky by user: each user's requests go to the
//! same target while it is up, and losing a target moves only the users it had.
//!
//! Each target owns [`VIRTUAL_NODES`] points on a 64-bit ring, placed by xxh3 of its URL and
//! the point's number (not its position in the list, so reordering or removing other targets
//! moves no point). A key belongs to the first point clockwise from its hash; when that
//! target is unusable, the walk continues clockwise to the next distinct target, which is
//! exactly where the key would land if the target were removed. See ADR 0007.

use xxhash_rust::xxh3::xxh3_64;

/// Points per target: enough to keep each target's share within a few percent of even for
/// the handful of targets an upstream has, few enough that the ring stays in cache.
pub const VIRTUAL_NODES: usize = 128;

/// The most targets one upstream may have (the walk tracks visited targets in a `u64`).
pub const MAX_TARGETS: usize = 64;

/// A consistent-hash ring over targets `0..n`.
#[derive(Debug, Clone)]
pub struct Ring {
    /// (point, target index), sorted by point.
    points: Vec<(u64, u8)>,
    targets: usize,
}

impl Ring {
    /// A ring over targets identified by `names` (their URLs); at most [`MAX_TARGETS`].
    pub fn new<S: AsRef<str>>(names: &[S]) -> Self {
        assert!(names.len() <= MAX_TARGETS, "too many targets for one ring");
        let mut points = Vec::with_capacity(names.len() * VIRTUAL_NODES);
        let mut buffer = String::new();
        for (index, name) in names.iter().enumerate() {
            for vnode in 0..VIRTUAL_NODES {
                buffer.clear();
                buffer.push_str(name.as_ref());
                buffer.push('#');
                buffer.push_str(&vnode.to_string());
                points.push((xxh3_64(buffer.as_bytes()), index as u8));
            }
        }
        points.sort_unstable();
        Self {
            points,
            targets: names.len(),
        }
    }

    /// The hash a key is placed by.
    pub fn hash(key: &str) -> u64 {
        xxh3_64(key.as_bytes())
    }

    /// The distinct targets clockwise from `hash`, the owner first. Allocates nothing.
    pub fn walk(&self, hash: u64) -> Walk<'_> {
        let start = self.points.partition_point(|&(point, _)| point < hash);
        Walk {
            ring: self,
            next: start,
            stepped: 0,
            seen: 0,
        }
    }

    /// The first target clockwise from `key` for which `usable` holds.
    pub fn owner(&self, key: &str, mut usable: impl FnMut(usize) -> bool) -> Option<usize> {
        self.walk(Self::hash(key)).find(|&target| usable(target))
    }
}

/// Iterator over a ring's distinct targets in clockwise order; see [`Ring::walk`].
#[derive(Debug, Clone)]
pub struct Walk<'a> {
    ring: &'a Ring,
    next: usize,
    stepped: usize,
    seen: u64,
}

impl Iterator for Walk<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let points = &self.ring.points;
        let all = if self.ring.targets == MAX_TARGETS {
            u64::MAX
        } else {
            (1u64 << self.ring.targets) - 1
        };
        while self.stepped < points.len() && self.seen != all {
            let (_, target) = points[(self.next) % points.len()];
            self.next += 1;
            self.stepped += 1;
            let bit = 1u64 << target;
            if self.seen & bit == 0 {
                self.seen |= bit;
                return Some(usize::from(target));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGETS: [&str; 3] = [
        "http://127.0.0.1:8082",
        "http://127.0.0.1:8092",
        "http://127.0.0.1:8102",
    ];
    const USERS: usize = 10_000;

    fn users() -> impl Iterator<Item = String> {
        (0..USERS).map(|i| format!("user-{i}"))
    }

    #[test]
    fn the_walk_visits_every_target_once() {
        let ring = Ring::new(&TARGETS);
        for user in users().take(100) {
            let mut order: Vec<usize> = ring.walk(Ring::hash(&user)).collect();
            order.sort_unstable();
            assert_eq!(order, vec![0, 1, 2]);
        }
        assert_eq!(Ring::new::<&str>(&[]).walk(7).next(), None);
    }

    #[test]
    fn users_spread_evenly() {
        let ring = Ring::new(&TARGETS);
        let mut counts = [0usize; 3];
        for user in users() {
            counts[ring.owner(&user, |_| true).unwrap()] += 1;
        }
        println!("ring distribution of {USERS} users over 3 targets: {counts:?}");
        for count in counts {
            // An even share is 3,333; allow ±20 %.
            assert!((2_666..=4_000).contains(&count), "{counts:?}");
        }
    }

    /// The property ADR 0007 rests on: when a target is lost, exactly its users move, and
    /// nobody else does, whether the target is skipped by the walk (unhealthy, breaker open)
    /// or removed from the configuration.
    #[test]
    fn losing_a_target_moves_only_its_users() {
        let ring = Ring::new(&TARGETS);
        let without_last = Ring::new(&TARGETS[..2]);
        let without_first = Ring::new(&TARGETS[1..]);
        for lost in 0..3 {
            let (mut had, mut moved, mut moved_by_removal) = (0, 0, 0);
            for user in users() {
                let before = ring.owner(&user, |_| true).unwrap();
                let after = ring.owner(&user, |t| t != lost).unwrap();
                if before == lost {
                    had += 1;
                }
                if before != after {
                    moved += 1;
                    assert_eq!(before, lost, "{user} moved off a target that stayed up");
                } else {
                    assert_ne!(before, lost);
                }
                // Rebuilding the ring without the target gives the same placement.
                let rebuilt = match lost {
                    0 => without_first.owner(&user, |_| true).map(|t| t + 1),
                    2 => without_last.owner(&user, |_| true),
                    _ => Some(after),
                };
                if rebuilt != Some(after) {
                    moved_by_removal += 1;
                }
            }
            println!(
                "target {lost} lost: {moved} of {USERS} users moved ({:.1} %), it had {had}",
                moved as f64 * 100.0 / USERS as f64
            );
            assert_eq!(moved, had);
            assert_eq!(moved_by_removal, 0);
            assert!((2_666..=4_000).contains(&moved));
        }
    }
}
