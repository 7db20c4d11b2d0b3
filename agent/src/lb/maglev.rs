//! Maglev consistent hashing: the lookup table of a consistent-hash service.
//!
//! The table is built as in the Maglev paper (Eisenbud et al., "Maglev: A Fast and
//! Reliable Software Network Load Balancer", NSDI 2016, section 3.4): every backend
//! has its own permutation of the table's entries, derived from two hashes of its
//! address (an offset and a skip, the table size being prime), and the backends take
//! turns claiming the next free entry of their permutation until the table is full.
//! Because a backend's permutation depends only on its own address, removing one
//! backend hands its entries to the others and leaves almost every other entry
//! where it was: clients hashed to the other backends stay put.
//!
//! Weights are honoured by turns: in round `r` a backend of weight `w` may hold up
//! to `floor(r × w / w_max)` entries, so the heaviest claims one entry per round and
//! the others in proportion (the paper's weighted variant, as Envoy builds it).
//!
//! The hashes are fixed (FNV-1a with a seed, then the splitmix64 finalizer): an
//! agent restarted or upgraded builds exactly the same table from the same
//! backends, so no client moves across a restart.

/// Whether `n` is prime (trial division: table sizes are at most a few million).
pub fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u64;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// What is wrong with a Maglev table size, if anything: Envoy requires a prime;
/// the kernel's tables hold up to `MAX_MAGLEV_TABLE_SIZE` entries.
pub fn table_size_problem(size: u64) -> Option<String> {
    let max = sockmesh_common::MAX_MAGLEV_TABLE_SIZE;
    if size > u64::from(max) {
        return Some(format!(
            "{size} exceeds the largest Maglev table the kernel holds, {max} (Envoy's default size)"
        ));
    }
    if !is_prime(size) {
        return Some(format!(
            "{size} is not a prime (Maglev needs a prime table size)"
        ));
    }
    None
}

/// A backend's name for hashing: its address as the maps store it (16 bytes,
/// IPv4-mapped for IPv4) and its port.
pub type MaglevKey = ([u8; 16], u16);

/// The Maglev table of `size` entries (a prime, at least 2) for `backends` (key,
/// weight at least 1): per entry, the position in `backends` of the backend that
/// owns it. Empty when there is no backend. The table depends on the order of
/// `backends` only where two backends' permutations collide in the same round;
/// callers pass them sorted, so the same set always gives the same table.
pub fn maglev_table(backends: &[(MaglevKey, u32)], size: u32) -> Vec<usize> {
    const FREE: usize = usize::MAX;
    let m = u64::from(size);
    if backends.is_empty() || m < 2 {
        return Vec::new();
    }
    struct Turn {
        /// The entry its permutation is at: `(offset + j × skip) mod m` for the
        /// j-th step, advanced by adding `skip` (no division in the fill loop).
        at: u64,
        skip: u64,
        weight: u64,
        taken: u64,
    }
    let mut turns: Vec<Turn> = backends
        .iter()
        .map(|(key, weight)| Turn {
            at: hash(key, 0) % m,
            skip: hash(key, 1) % (m - 1) + 1,
            weight: u64::from((*weight).max(1)),
            taken: 0,
        })
        .collect();
    let w_max = turns.iter().map(|t| t.weight).max().unwrap_or(1);
    let mut table = vec![FREE; size as usize];
    let mut filled = 0u64;
    let mut round = 0u64;
    while filled < m {
        round += 1;
        for (position, t) in turns.iter_mut().enumerate() {
            if filled == m {
                break;
            }
            // The backend's quota for this round: floor(round × w / w_max).
            if u128::from(t.taken) * u128::from(w_max) >= u128::from(round) * u128::from(t.weight) {
                continue;
            }
            // Its next free entry (the permutation visits every entry once, and
            // the table is not full, so this ends).
            let entry = loop {
                let e = t.at as usize;
                t.at += t.skip;
                if t.at >= m {
                    t.at -= m;
                }
                if table[e] == FREE {
                    break e;
                }
            };
            table[entry] = position;
            t.taken += 1;
            filled += 1;
        }
    }
    table
}

/// FNV-1a over the key with `seed` mixed in first, finished with the splitmix64
/// finalizer (FNV alone spreads the low bits of similar addresses poorly).
fn hash(key: &MaglevKey, seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in key.0.iter().chain(key.1.to_be_bytes().iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> MaglevKey {
        let mut a = [0u8; 16];
        a[10] = 0xff;
        a[11] = 0xff;
        a[12..].copy_from_slice(&[10, 1, (i >> 8) as u8, i as u8]);
        (a, 8080)
    }

    fn backends(ids: impl IntoIterator<Item = u32>) -> Vec<(MaglevKey, u32)> {
        ids.into_iter().map(|i| (key(i), 1)).collect()
    }

    /// Entries owned per backend id.
    fn shares(b: &[(MaglevKey, u32)], table: &[usize]) -> Vec<usize> {
        let mut c = vec![0; b.len()];
        for &p in table {
            c[p] += 1;
        }
        c
    }

    #[test]
    fn primes() {
        let primes: Vec<u64> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        for p in [251, 16_381, 65_537, 5_000_011] {
            assert!(is_prime(p), "{p}");
        }
        for n in [65_536, 16_383, 1_000_000, 5_000_013] {
            assert!(!is_prime(n), "{n}");
        }
    }

    #[test]
    fn every_entry_is_owned_and_equal_weights_share_within_one_entry() {
        let b = backends(0..10);
        let t = maglev_table(&b, 16_381);
        assert_eq!(t.len(), 16_381);
        let c = shares(&b, &t);
        let (lo, hi) = (c.iter().min(), c.iter().max());
        assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{c:?}");
        assert!(maglev_table(&[], 251).is_empty());
    }

    #[test]
    fn weights_set_the_shares() {
        let b = vec![(key(1), 1), (key(2), 2), (key(3), 5)];
        let t = maglev_table(&b, 16_381);
        let c = shares(&b, &t);
        for (i, &(_, w)) in b.iter().enumerate() {
            let want = 16_381.0 * f64::from(w) / 8.0;
            assert!(
                (c[i] as f64 - want).abs() <= 2.0,
                "backend {i}: {} entries, {want} expected",
                c[i]
            );
        }
    }

    #[test]
    fn the_same_backends_give_the_same_table() {
        let b = backends(0..7);
        assert_eq!(maglev_table(&b, 4093), maglev_table(&b, 4093));
        // A fixed entry pins the hash: changing it would move every client of
        // every Maglev service across an upgrade.
        assert_eq!(hash(&key(1), 0) % 4093, 3515);
    }

    /// Entries whose owner changed between two tables, by backend id.
    fn moved(a: (&[(MaglevKey, u32)], &[usize]), b: (&[(MaglevKey, u32)], &[usize])) -> usize {
        a.1.iter()
            .zip(b.1)
            .filter(|(x, y)| a.0[**x].0 != b.0[**y].0)
            .count()
    }

    #[test]
    fn removing_a_backend_moves_little_more_than_its_own_entries() {
        for n in [3u32, 10, 100] {
            let all = backends(0..n);
            let less = backends((0..n).filter(|&i| i != n / 2));
            let (ta, tb) = (maglev_table(&all, 16_381), maglev_table(&less, 16_381));
            let changed = moved((&all, &ta), (&less, &tb));
            let own = shares(&all, &ta)[(n / 2) as usize];
            // The removed backend's entries must move; the others almost never.
            let others = changed - own;
            assert!(
                (others as f64) < 0.02 * 16_381.0,
                "n = {n}: {others} entries of kept backends moved (own: {own})"
            );
        }
    }
}
