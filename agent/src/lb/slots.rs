//! Weighted slot tables.
//!
//! The kernel picks a uniformly random slot of a service; this module decides how
//! many slots each backend owns so that the pick follows the configured weights.

use sockmesh_common::MAX_SLOTS_PER_SERVICE;

/// Slot table for backends with the given weights (each at least 1): the returned
/// vector holds, per slot, the position in `weights` of the backend owning it.
///
/// Weights are reduced by their greatest common divisor; if the reduced total fits
/// in [`MAX_SLOTS_PER_SERVICE`] the apportionment is exact. Otherwise every backend
/// gets one slot and the remaining slots are shared by largest remainder, so the
/// error per backend is below one slot in 16,384.
pub fn weighted_slots(weights: &[u32]) -> Vec<usize> {
    weighted_slots_capped(weights, MAX_SLOTS_PER_SERVICE as usize)
}

/// [`weighted_slots`] within `cap` slots (at least one per backend).
pub fn weighted_slots_capped(weights: &[u32], cap: usize) -> Vec<usize> {
    if weights.is_empty() {
        return Vec::new();
    }
    let g = weights.iter().copied().fold(0u32, gcd).max(1);
    let reduced: Vec<u64> = weights.iter().map(|&w| u64::from(w.max(1) / g)).collect();
    let total: u64 = reduced.iter().sum();
    let cap = (cap as u64).max(weights.len() as u64);
    let counts: Vec<u64> = if total <= cap {
        reduced
    } else {
        apportion(&reduced, total, cap)
    };
    let mut slots = Vec::with_capacity(usize::try_from(counts.iter().sum::<u64>()).unwrap_or(0));
    for (i, &c) in counts.iter().enumerate() {
        for _ in 0..c {
            slots.push(i);
        }
    }
    slots
}

/// How many slots [`weighted_slots`] gives `weights`, without building them:
/// the reduced total, or the cap when that is larger.
pub fn slot_count(weights: impl Iterator<Item = u32> + Clone) -> usize {
    let g = weights.clone().fold(0u32, gcd).max(1);
    let total: u64 = weights.map(|w| u64::from(w.max(1) / g)).sum();
    usize::try_from(total.min(u64::from(MAX_SLOTS_PER_SERVICE))).unwrap_or(usize::MAX)
}

/// Shares `cap` slots among `weights` (summing to `total` > `cap`) by largest
/// remainder, giving every backend at least one slot.
fn apportion(weights: &[u64], total: u64, cap: u64) -> Vec<u64> {
    let mut counts: Vec<u64> = Vec::with_capacity(weights.len());
    let mut remainders: Vec<(u64, usize)> = Vec::with_capacity(weights.len());
    for (i, &w) in weights.iter().enumerate() {
        let exact = u128::from(w) * u128::from(cap);
        let q = (exact / u128::from(total)) as u64;
        counts.push(q.max(1));
        remainders.push(((exact % u128::from(total)) as u64, i));
    }
    let used: u64 = counts.iter().sum();
    if used <= cap {
        // Largest remainder first; ties to the lower index for determinism.
        remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, i) in remainders.iter().take((cap - used) as usize) {
            counts[i] += 1;
        }
    } else {
        // Minimum-one bumps overshot: take back from the smallest remainders among
        // backends that keep at least one slot.
        remainders.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let mut excess = used - cap;
        while excess > 0 {
            let before = excess;
            for &(_, i) in &remainders {
                if excess == 0 {
                    break;
                }
                if counts[i] > 1 {
                    counts[i] -= 1;
                    excess -= 1;
                }
            }
            if before == excess {
                break; // more backends than slots: cannot happen (n <= MAX_BACKENDS_PER_SERVICE)
            }
        }
    }
    counts
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(slots: &[usize], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &s in slots {
            c[s] += 1;
        }
        c
    }

    #[test]
    fn equal_weights_one_slot_each() {
        assert_eq!(weighted_slots(&[1, 1, 1]), vec![0, 1, 2]);
        assert_eq!(weighted_slots(&[7, 7]), vec![0, 1]);
    }

    #[test]
    fn exact_ratios_are_reduced() {
        assert_eq!(counts(&weighted_slots(&[100, 300]), 2), vec![1, 3]);
        assert_eq!(counts(&weighted_slots(&[2, 3, 5]), 3), vec![2, 3, 5]);
    }

    #[test]
    fn empty_gives_no_slots() {
        assert!(weighted_slots(&[]).is_empty());
    }

    #[test]
    fn large_weights_are_capped_and_proportional() {
        let weights = [1_000_000, 3_000_000, 1, 7_777_777];
        let s = weighted_slots(&weights);
        assert_eq!(s.len(), MAX_SLOTS_PER_SERVICE as usize);
        let c = counts(&s, weights.len());
        assert!(
            c.iter().all(|&x| x >= 1),
            "every backend keeps a slot: {c:?}"
        );
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        for (i, &w) in weights.iter().enumerate() {
            let want = f64::from(w) / total * f64::from(MAX_SLOTS_PER_SERVICE);
            assert!(
                (c[i] as f64 - want).abs() < 1.0,
                "backend {i}: {} vs {want}",
                c[i]
            );
        }
    }

    #[test]
    fn slot_count_is_the_length_of_the_slot_table() {
        let cases: [&[u32]; 6] = [
            &[],
            &[1, 1, 1],
            &[100, 300],
            &[2, 3, 5],
            &[1_000_000, 3_000_000, 1, 7_777_777],
            &[16_384, 1],
        ];
        for weights in cases {
            assert_eq!(
                slot_count(weights.iter().copied()),
                weighted_slots(weights).len(),
                "{weights:?}"
            );
        }
        let many: Vec<u32> = (0..1024).map(|i| 1000 + i).collect();
        assert_eq!(
            slot_count(many.iter().copied()),
            weighted_slots(&many).len()
        );
    }

    #[test]
    fn max_backends_with_coprime_weights_fit() {
        let weights: Vec<u32> = (0..1024).map(|i| 1000 + i).collect();
        let s = weighted_slots(&weights);
        assert_eq!(s.len(), MAX_SLOTS_PER_SERVICE as usize);
        assert!(counts(&s, weights.len()).iter().all(|&x| x >= 1));
    }
}
