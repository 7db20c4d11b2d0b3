//! Test oracle: the long-run share of new connections Envoy gives each endpoint of one
//! `ClusterLoadAssignment` (priorities, localities, overprovisioning, degraded, panic).
//! Written from Envoy's docs and source, independently of sockmesh's own code. Pure std.
//!
//! Sources (github.com/envoyproxy/envoy main, 2025-26 snapshots; `weighted_priority_health` is
//! in the API since at least 1.27):
//! * `[LB]`  source/extensions/load_balancing_policies/common/load_balancer_impl.cc (in older
//!   releases source/common/upstream/load_balancer_impl.cc): `LoadBalancerBase::
//!   recalculatePerPriorityState`, `distributeLoad`, `recalculatePerPriorityPanic`,
//!   `recalculateLoadInTotalPanic`, `isHostSetInPanic`, `choosePriority`, `chooseHostSet`,
//!   `ZoneAwareLoadBalancerBase::hostSourceToUse`/`hostSourceToHosts`; load_balancer_impl.h
//!   `calculateNormalizedTotalAvailability`.
//! * `[UP]`  source/common/upstream/upstream_impl.cc: `HostSetImpl::rebuildLocalityScheduler`,
//!   `effectiveLocalityWeight`, `chooseHealthyLocality`/`chooseDegradedLocality`,
//!   `ClusterImplBase::partitionHostList`, `excludeBasedOnHealthFlag`,
//!   `PriorityStateManager::initializePriorityFor`, `HostImplBase::setEdsHealthFlag`,
//!   `HostImpl::weight` (the newest tree has the locality math in
//!   source/extensions/load_balancing_policies/common/locality_wrr.cc `LocalityWrr`).
//! * `[EDS]` source/common/upstream/eds.cc: `policy.overprovisioning_factor` default
//!   `kDefaultOverProvisioningFactor` = 140, `policy.weighted_priority_health`.
//! * `[PCT]` source/common/protobuf/utility.cc `ProtobufPercentHelper::convertPercent`.
//! * `[DOC]` envoyproxy.io/docs/envoy/latest/intro/arch_overview/upstream/load_balancing/
//!   priority, overprovisioning, locality_weight, degraded, panic_threshold, excluded.
//! * `[UT]`  test/extensions/load_balancing_policies/common/load_balancer_impl_base_test.cc.
//!
//! Scope: ROUND_ROBIN / LEAST_REQUEST long-run shares (host weight / sum of weights in the chosen
//! set); no zone-aware routing (no local cluster), no subsets, no slow start, no runtime overrides,
//! `fail_traffic_on_panic` false. RANDOM in Envoy ignores host weights (`hosts[hash % n]`).

/// EDS `HealthStatus` as Envoy classifies it (`[UP]` `setEdsHealthFlag`, `coarseHealth`,
/// `excludeBasedOnHealthFlag`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// UNKNOWN or HEALTHY.
    Healthy,
    /// DEGRADED: only used once healthy capacity runs out.
    Degraded,
    /// UNHEALTHY or TIMEOUT (and DRAINING in Envoy without the
    /// `exclude_host_in_eds_status_draining` change).
    Unhealthy,
    /// DRAINING in current Envoy: unhealthy and *excluded*, i.e. left out of every denominator
    /// (priority health, panic test, locality availability) but still one of the priority's
    /// `hosts()`: it counts for total-panic loads and is picked in panic (`[DOC]` excluded).
    Draining,
}

#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `LbEndpoint.load_balancing_weight`; Envoy uses max(1, w) (`[UP]` `HostImpl::weight`).
    pub weight: u32,
    pub health: Health,
}

/// One locality group of one priority. Envoy merges `LocalityLbEndpoints` with an equal
/// `Locality` at the same priority into one group (a `std::map` in `updateClusterPrioritySet`);
/// callers must do the same before building this.
#[derive(Clone, Debug)]
pub struct Locality {
    pub priority: u32,
    /// `LocalityLbEndpoints.load_balancing_weight`; unset means 0 (`initializePriorityFor` only
    /// stores set weights; the map default is 0). Used only with `locality_weighted`.
    pub weight: Option<u32>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug)]
pub struct Cluster {
    pub localities: Vec<Locality>,
    /// Percent, `ClusterLoadAssignment.policy.overprovisioning_factor` (default 140, must be > 0).
    pub overprovisioning_factor: u32,
    /// `common_lb_config.locality_weighted_lb_config` is set.
    pub locality_weighted: bool,
    /// `common_lb_config.healthy_panic_threshold` (Percent, default 50.0).
    pub panic_threshold_percent: f64,
    /// `ClusterLoadAssignment.policy.weighted_priority_health`.
    pub weighted_priority_health: bool,
}

impl Cluster {
    pub fn new(localities: Vec<Locality>) -> Self {
        Cluster {
            localities,
            overprovisioning_factor: 140,
            locality_weighted: false,
            panic_threshold_percent: 50.0,
            weighted_priority_health: false,
        }
    }
}

fn weight(e: &Endpoint) -> u64 {
    u64::from(e.weight.max(1))
}

/// Host sets exist for priorities 0..=max (gaps are empty sets; P0 always exists).
pub fn num_priorities(c: &Cluster) -> usize {
    c.localities
        .iter()
        .map(|l| l.priority as usize + 1)
        .max()
        .unwrap_or(1)
}

fn hosts(c: &Cluster, p: usize) -> impl Iterator<Item = &Endpoint> + '_ {
    c.localities
        .iter()
        .filter(move |l| l.priority as usize == p)
        .flat_map(|l| l.endpoints.iter())
}

fn count(c: &Cluster, p: usize, h: Health) -> u64 {
    hosts(c, p).filter(|e| e.health == h).count() as u64
}

/// Per-priority (healthy, degraded) availability, integers 0..=100 (`[LB]`
/// `recalculatePerPriorityState`): with `n = hosts - excluded > 0`,
/// `min(100, opf * healthy / total)` in u64 integer division, where healthy/degraded/total are
/// host COUNTS (total = n), or sums of host WEIGHTS when `weighted_priority_health` (total = all
/// weights - excluded weights). 0 when n == 0.
pub fn priority_health(c: &Cluster) -> (Vec<u32>, Vec<u32>) {
    let n = num_priorities(c);
    let (mut h, mut d) = (vec![0u32; n], vec![0u32; n]);
    for p in 0..n {
        if hosts(c, p).filter(|e| e.health != Health::Draining).count() == 0 {
            continue;
        }
        let metric = |e: &Endpoint| {
            if c.weighted_priority_health {
                weight(e)
            } else {
                1
            }
        };
        let sum = |keep: &dyn Fn(Health) -> bool| -> u64 {
            hosts(c, p).filter(|e| keep(e.health)).map(metric).sum()
        };
        let total = sum(&|s| s != Health::Draining);
        let opf = u64::from(c.overprovisioning_factor);
        h[p] = (opf * sum(&|s| s == Health::Healthy) / total).min(100) as u32;
        d[p] = (opf * sum(&|s| s == Health::Degraded) / total).min(100) as u32;
    }
    (h, d)
}

/// `[LB]` `distributeLoad`: in priority order, `load[i] = min(left, avail[i] * 100 / norm)`.
/// Returns the loads, the first priority with avail > 0, and what is left.
fn distribute(avail: &[u32], mut left: u32, norm: u32) -> (Vec<u32>, Option<usize>, u32) {
    let mut load = vec![0; avail.len()];
    for (i, &a) in avail.iter().enumerate() {
        load[i] = left.min(a * 100 / norm);
        left -= load[i];
    }
    (load, avail.iter().position(|&a| a > 0), left)
}

/// Effective threshold: `min(100, trunc(100 * (pct / 100.0)))` — `convertPercent` truncates the
/// double (`[PCT]`), so 50.9 gives 50 and 29.0 gives 28 (100 * 0.29 = 28.999999999999996).
pub fn panic_threshold(c: &Cluster) -> u64 {
    ((100.0 * (c.panic_threshold_percent / 100.0)) as u64).min(100)
}

/// `[LB]` `isHostSetInPanic`: host COUNTS always (even with `weighted_priority_health`):
/// `100.0*healthy/n + 100.0*degraded/n < threshold` (both 0.0 when n = hosts - excluded = 0).
fn host_set_in_panic(c: &Cluster, p: usize, threshold: u64) -> bool {
    let n = hosts(c, p).filter(|e| e.health != Health::Draining).count() as u64;
    let pct = |k: u64| {
        if n == 0 {
            0.0
        } else {
            100.0 * k as f64 / n as f64
        }
    };
    pct(count(c, p, Health::Healthy)) + pct(count(c, p, Health::Degraded)) < threshold as f64
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriorityState {
    /// Integer percent of new connections targeting each priority's healthy hosts.
    pub healthy_load: Vec<u32>,
    /// Integer percent targeting each priority's degraded hosts. healthy + degraded sums to 100.
    pub degraded_load: Vec<u32>,
    /// Priority in panic: its whole load (healthy + degraded) goes to ALL its hosts.
    pub panic: Vec<bool>,
}

/// The per-priority loads and panic flags, as `[LB]` computes them:
/// 1. `norm = min(100, Σhealth + Σdegraded)` (`calculateNormalizedTotalAvailability`).
/// 2. If norm > 0: healthy loads = distribute(health, 100); degraded loads = distribute(degraded,
///    what is left); any remainder (rounding) goes to the first priority with health > 0,
///    else to the degraded load of the first with degraded > 0.
/// 3. threshold T = `panic_threshold`. If T == 0 and norm == 0: healthy_load[0] = 100, no panic.
/// 4. Else panic[p] = norm < 100 && `isHostSetInPanic(p)` (an empty priority is in panic if T > 0).
/// 5. If every priority is in panic ("total panic"): loads are recomputed from host COUNTS
///    including excluded hosts: `100 * hosts_p / Σhosts` (integer), degraded 0, remainder to the
///    first non-empty priority; Σhosts == 0 gives healthy_load[0] = 100.
/// 6. If norm == 0 without total panic (only possible with opf < 100): `choosePriority` finds no
///    load and falls back to (P0, healthy) — modelled as healthy_load[0] = 100.
pub fn priority_state(c: &Cluster) -> PriorityState {
    let n = num_priorities(c);
    let (h, d) = priority_health(c);
    let norm = (h.iter().sum::<u32>() + d.iter().sum::<u32>()).min(100);
    let (mut hl, mut dl) = (vec![0u32; n], vec![0u32; n]);
    if norm > 0 {
        let (l1, first_h, left) = distribute(&h, 100, norm);
        let (l2, first_d, left) = distribute(&d, left, norm);
        (hl, dl) = (l1, l2);
        match (first_h, first_d) {
            (Some(i), _) => hl[i] += left,
            (None, Some(i)) => dl[i] += left,
            (None, None) => {}
        }
    }
    let threshold = panic_threshold(c);
    let mut panic = vec![false; n];
    if threshold == 0 && norm == 0 {
        hl[0] = 100;
        return PriorityState {
            healthy_load: hl,
            degraded_load: dl,
            panic,
        };
    }
    for (p, flag) in panic.iter_mut().enumerate() {
        *flag = norm != 100 && host_set_in_panic(c, p, threshold);
    }
    if panic.iter().all(|&x| x) {
        let counts: Vec<u64> = (0..n).map(|p| hosts(c, p).count() as u64).collect();
        let total: u64 = counts.iter().sum();
        (hl, dl) = (vec![0; n], vec![0; n]);
        match counts.iter().position(|&k| k > 0) {
            None => hl[0] = 100,
            Some(first) => {
                for p in 0..n {
                    hl[p] = (100 * counts[p] / total) as u32;
                }
                hl[first] += 100 - hl.iter().sum::<u32>();
            }
        }
    } else if norm == 0 {
        hl[0] = 100;
    }
    PriorityState {
        healthy_load: hl,
        degraded_load: dl,
        panic,
    }
}

/// (healthy_load, degraded_load) integer percentages per priority; see `priority_state`.
pub fn priority_loads(c: &Cluster) -> (Vec<u32>, Vec<u32>) {
    let s = priority_state(c);
    (s.healthy_load, s.degraded_load)
}

/// Panic flag per priority; see `priority_state`.
pub fn panic(c: &Cluster) -> Vec<bool> {
    priority_state(c).panic
}

/// Per locality: (healthy-scheduler weight, degraded-scheduler weight) (`[UP]`
/// `effectiveLocalityWeight`): `weight * min(1.0, (opf / 100.0) * (1.0 * eligible / n))` in f64,
/// eligible = healthy resp. degraded host COUNT of the locality, n = hosts - excluded of the
/// locality (0.0 when n == 0). Host weights and `weighted_priority_health` play no part.
/// Only used when `locality_weighted`.
pub fn locality_effective_weights(c: &Cluster) -> Vec<(f64, f64)> {
    let opf = f64::from(c.overprovisioning_factor);
    c.localities
        .iter()
        .map(|l| {
            let n = l
                .endpoints
                .iter()
                .filter(|e| e.health != Health::Draining)
                .count();
            if n == 0 {
                return (0.0, 0.0);
            }
            let w = f64::from(l.weight.unwrap_or(0));
            let eff = |h: Health| {
                let k = l.endpoints.iter().filter(|e| e.health == h).count();
                w * 1.0f64.min((opf / 100.0) * (1.0 * k as f64 / n as f64))
            };
            (eff(Health::Healthy), eff(Health::Degraded))
        })
        .collect()
}

/// Adds `amount` to the hosts of `locs` accepted by `keep`, in proportion to host weight.
/// An empty set gets nothing: Envoy returns no host and the connection fails.
fn spread(
    out: &mut [Vec<f64>],
    c: &Cluster,
    locs: &[usize],
    keep: impl Fn(Health) -> bool,
    amount: f64,
) {
    let members = || {
        locs.iter().flat_map(|&li| {
            c.localities[li]
                .endpoints
                .iter()
                .enumerate()
                .map(move |(ei, e)| (li, ei, e))
        })
    };
    let total: u64 = members()
        .filter(|m| keep(m.2.health))
        .map(|m| weight(m.2))
        .sum();
    for (li, ei, e) in members().filter(|m| keep(m.2.health)) {
        out[li][ei] += amount * weight(e) as f64 / total as f64;
    }
}

/// Long-run share of new connections per endpoint (same shape as `c.localities`).
/// Per priority p (`[LB]` `hostSourceToUse`, `hostSourceToHosts`):
/// * panic[p]: (healthy_load + degraded_load)/100 over ALL hosts of p (unhealthy and excluded
///   ones too), by host weight, ignoring localities and locality weights.
/// * else healthy_load/100 goes to healthy hosts: with `locality_weighted` and some locality of
///   p having healthy-scheduler weight > 0, each such locality gets eff / Σeff (EDF pick) and
///   spreads over its healthy hosts by host weight; otherwise (not locality weighted, or all
///   effective weights 0) over all healthy hosts of p by host weight. Degraded likewise with
///   the degraded-scheduler weights (computed from degraded counts) and degraded hosts.
///
/// Sums to 1 when a host can be chosen, else all 0: no endpoints at all, or the P0 fallback of
/// `priority_state` steps 3/6 (e.g. all unhealthy, panic disabled) finds no healthy P0 host.
pub fn shares(c: &Cluster) -> Vec<Vec<f64>> {
    let mut out: Vec<Vec<f64>> = c
        .localities
        .iter()
        .map(|l| vec![0.0; l.endpoints.len()])
        .collect();
    let st = priority_state(c);
    let eff = locality_effective_weights(c);
    for p in 0..num_priorities(c) {
        let locs: Vec<usize> = (0..c.localities.len())
            .filter(|&i| c.localities[i].priority as usize == p)
            .collect();
        if st.panic[p] {
            let amount = f64::from(st.healthy_load[p] + st.degraded_load[p]) / 100.0;
            spread(&mut out, c, &locs, |_| true, amount);
            continue;
        }
        for (load, want, degraded) in [
            (st.healthy_load[p], Health::Healthy, false),
            (st.degraded_load[p], Health::Degraded, true),
        ] {
            let amount = f64::from(load) / 100.0;
            let w = |li: usize| if degraded { eff[li].1 } else { eff[li].0 };
            let sched: f64 = locs.iter().map(|&li| w(li)).filter(|&x| x > 0.0).sum();
            if c.locality_weighted && sched > 0.0 {
                for &li in locs.iter().filter(|&&li| w(li) > 0.0) {
                    spread(&mut out, c, &[li], |h| h == want, amount * w(li) / sched);
                }
            } else {
                spread(&mut out, c, &locs, |h| h == want, amount);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::Health::{Degraded as D, Draining as X, Healthy as H, Unhealthy as U};
    use super::*;

    fn num(s: &str) -> u32 {
        s.parse().expect("number")
    }
    /// Cluster from a spec of space-separated tokens: options `lw` (locality weighted), `wph`
    /// (weighted_priority_health), `opf=N`, `panic=F`; localities `P[/W]:items`, items
    /// comma-separated `<count><h|d|u|x>[*weight]` (healthy, degraded, unhealthy, draining).
    fn cl(spec: &str) -> Cluster {
        let mut c = Cluster::new(vec![]);
        for tok in spec.split_whitespace() {
            let Some((head, items)) = tok.split_once(':') else {
                match tok.split_once('=') {
                    Some(("opf", v)) => c.overprovisioning_factor = num(v),
                    Some((_, v)) => c.panic_threshold_percent = v.parse().expect("f64"),
                    None if tok == "lw" => c.locality_weighted = true,
                    None => c.weighted_priority_health = true,
                }
                continue;
            };
            let (p, w) = head.split_once('/').unwrap_or((head, ""));
            let mut endpoints = vec![];
            for item in items.split(',').filter(|i| !i.is_empty()) {
                let (item, w) = item.split_once('*').unwrap_or((item, "1"));
                let (n, kind) = item.split_at(item.len() - 1);
                let health = [H, D, U, X]["hdux".find(kind).expect("h, d, u or x")];
                let weight = num(w);
                endpoints.extend((0..num(n)).map(|_| Endpoint { weight, health }));
            }
            let (priority, weight) = (num(p), w.parse().ok());
            c.localities.push(Locality {
                priority,
                weight,
                endpoints,
            });
        }
        c
    }
    /// Priorities of 100 hosts each with the given healthy percentages.
    fn pct(healthy: &[u32]) -> String {
        let l = healthy.iter().enumerate();
        l.map(|(p, h)| format!("{p}:{h}h,{}u ", 100 - h)).collect()
    }
    /// Rows of space-separated numbers, rows separated by ','.
    fn rows(t: &str) -> Vec<Vec<u32>> {
        let row = |r: &str| r.split_whitespace().map(num).collect();
        t.split(',').map(row).collect()
    }
    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }
    fn sum(s: &[Vec<f64>]) -> f64 {
        s.iter().flatten().sum()
    }
    /// Every endpoint of `spec` gets `x`.
    fn uniform(spec: &str, x: f64) -> bool {
        shares(&cl(spec)).iter().flatten().all(|&v| close(v, x))
    }
    fn join(v: &[u32]) -> String {
        v.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
    }
    fn state(st: &PriorityState) -> String {
        let yn: String = st
            .panic
            .iter()
            .map(|&p| if p { 'Y' } else { 'N' })
            .collect();
        format!(
            "{} / {} / {yn}",
            join(&st.healthy_load),
            join(&st.degraded_load)
        )
    }
    /// `want` = "healthy loads / degraded loads / panic flags", e.g. "70 30 / 0 0 / NY";
    /// also checks that each priority's endpoints share exactly its load.
    fn check(spec: &str, want: &str) {
        let (c, st) = (cl(spec), priority_state(&cl(spec)));
        assert_eq!(state(&st), want, "{spec}");
        let s = shares(&c);
        for (p, (h, d)) in st.healthy_load.iter().zip(&st.degraded_load).enumerate() {
            let mine = c
                .localities
                .iter()
                .zip(&s)
                .filter(|(l, _)| l.priority as usize == p);
            let got: f64 = mine.map(|(_, v)| v.iter().sum::<f64>()).sum();
            assert!(close(got, f64::from(h + d) / 100.0), "P{p}: {spec}");
        }
    }
    const NN: &str = "0 0 / NN";

    /// [DOC] priority.rst tables, 100 hosts per level ("healthy% of each level, traffic% to
    /// each level"): two levels with P=1 100% healthy; both degrading; three levels.
    #[test]
    fn docs_priority_levels() {
        for r in rows("100 100 0, 72 100 0, 71 99 1, 50 70 30, 25 35 65, 0 0 100") {
            check(&pct(&[r[0], 100]), &format!("{} {} / {NN}", r[1], r[2]));
        }
        for r in rows("72 72 100 0, 71 71 99 1, 50 50 70 30, 25 100 35 65") {
            check(&pct(&r[..2]), &format!("{} {} / {NN}", r[2], r[3]));
        }
        check(&pct(&[25, 25]), "50 50 / 0 0 / YY"); // norm 70, both in panic
        let t = "100 100 100 100 0 0, 72 72 100 100 0 0, 71 71 100 99 1 0, \
                 50 50 100 70 30 0, 25 100 100 35 65 0, 25 25 100 35 35 30";
        for r in rows(t) {
            check(&pct(&r[..3]), &format!("{} / 0 0 0 / NNN", join(&r[3..])));
        }
        // Last docs row 25/25/20: the docs say 36/36/28 (35/35/28 normalized). The code: every
        // level under the 50% threshold and norm 98 < 100 -> total panic -> by host count,
        // 33/33/33 + remainder to P0. With panic disabled: 35/35/28, remainder 2 to P0.
        check(&pct(&[25, 25, 20]), "34 33 33 / 0 0 0 / YYY");
        let no_panic = format!("panic=0 {}", pct(&[25, 25, 20]));
        check(&no_panic, "37 35 28 / 0 0 0 / NNN");
    }

    /// [DOC] overprovisioning.rst ("unavailable below 72%"); [UT] OverProvisioningFactor.
    #[test]
    fn overprovisioning() {
        assert_eq!(priority_health(&cl(&pct(&[72, 71]))).0, vec![100, 99]);
        check("0:2h,2u 1:2h,2u", &format!("70 30 / {NN}"));
        check("opf=100 0:2h,2u 1:2h,2u", &format!("50 50 / {NN}"));
    }

    /// [DOC] degraded.rst table: "P=0 healthy/degraded/unhealthy %; traffic to healthy, to
    /// degraded hosts" (one priority of 100 hosts).
    #[test]
    fn docs_degraded() {
        let t = "100 0 0 100 0, 71 0 29 100 0, 71 29 0 99 1, 25 65 10 35 65, 5 0 95 100 0";
        for r in rows(t) {
            let spec = format!("0:{}h,{}d,{}u", r[0], r[1], r[2]);
            let panicked = if r[0] == 5 { "Y" } else { "N" };
            check(&spec, &format!("{} / {} / {panicked}", r[3], r[4]));
        }
        let s = shares(&cl("0:25h,65d,10u"));
        assert!(close(s[0][0], 0.35 / 25.0) && close(s[0][25], 0.01) && s[0][99] == 0.0);
        // 5/0/95 is in (total) panic: its 100% goes to all 100 hosts, 1% each.
        assert!(uniform("0:5h,95u", 0.01));
    }

    /// [DOC] panic_threshold.rst tables (threshold 50%) and its total-panic examples.
    #[test]
    fn docs_panic_threshold() {
        for r in rows("72 100 0, 71 99 1, 50 70 30, 25 35 65, 0 0 100") {
            check(&pct(&[r[0], 100]), &format!("{} {} / {NN}", r[1], r[2]));
        }
        for r in rows("72 72 100 0, 71 71 99 1, 50 60 70 30, 25 100 35 65") {
            check(&pct(&r[..2]), &format!("{} {} / {NN}", r[2], r[3]));
        }
        check(&pct(&[25, 25]), "50 50 / 0 0 / YY");
        // Docs: 7%/93%. Code: 7*100/98 = 7, min(93, 91*100/98) = 92, remainder 1 to P0.
        check(&pct(&[5, 65]), "8 92 / 0 0 / YN");
        let s = shares(&cl(&pct(&[5, 65])));
        assert!(close(s[0][99], 0.0008) && close(s[1][0], 0.92 / 65.0) && s[1][99] == 0.0);
        check("0:5u 1:5u", "50 50 / 0 0 / YY");
        check("0:2u 1:8u", "20 80 / 0 0 / YY");
        assert!(uniform("0:2u 1:8u", 0.1));
    }

    /// [UT] GentleFailover, GentleFailoverWithExtraLevels, WeightedPriorityHealth* vectors.
    #[test]
    fn envoy_unit_tests() {
        let (n3, y2, y3) = ("0 0 0 / NNN", "0 0 / YY", "0 0 0 / YYY");
        check("0:1h,3x 1:1h,4u", &format!("100 0 / {NN}"));
        check("0:4x 1:1h,3u", &format!("50 50 / {y2}"));
        check("0:3u,1x 1:1h,3u,2x", &format!("40 60 / {y2}")); // counts hosts() incl. excluded
        check("0:1h,4u 1:1h,4u 2:1h,4u", &format!("34 33 33 / {y3}"));
        check("0:5u 1:5u 2:4h,1u", &format!("0 0 100 / {n3}"));
        check("0:5u 1:5u 2:2h,3u", &format!("34 33 33 / {y3}"));
        check("0:5d 1:2h,2d,1u 2:2h,3u", &format!("0 56 44 / {n3}"));
        check("0:5u 1:3u 2:2u", &format!("50 30 20 / {y3}"));
        check("0:5u 1:2h,4u 2:1h,2u", &format!("37 42 21 / {y3}"));
        check("0:1d,4u 1:5d 2:1h,4u", "0 0 28 / 28 44 0 / NNN");
        // Panic disabled, nothing healthy: the remainder goes to the first degraded priority.
        check("panic=0 0:5u 1:2d,3u 2:1d,4u", "0 0 0 / 0 67 33 / NNN");
        // weighted_priority_health (opf 100): weights instead of counts, for priority health only.
        check("wph opf=100 0:2h*3,2u*2 1:1h", &format!("60 40 / {NN}"));
        check("opf=100 0:2h*3,2u*2 1:1h", &format!("50 50 / {NN}")); // counts: 2 of 4
        check(
            "wph opf=100 0:1h*4,1x*10,1u*6 1:1h",
            &format!("40 60 / {NN}"),
        );
        check(
            "wph opf=100 0:1h*4,1d*3,1u*2,1u 1:1h,1d*9",
            "40 10 / 30 20 / NN",
        );
    }

    /// [DOC] locality_weight.rst: X weight 1, Y weight 2, Y 100% healthy ("X healthy%, traffic%
    /// to X"). The docs use an integer availability (69% -> 96); Envoy uses f64 (0.966), so the
    /// 69% row is really 32.57%.
    #[test]
    fn docs_locality_weighted() {
        for r in rows("100 33, 70 33, 69 32, 50 26, 25 15, 0 0") {
            let c = cl(&format!("lw 0/1:{}h,{}u 0/2:100h", r[0], 100 - r[0]));
            let s = shares(&c);
            let x: f64 = s[0].iter().sum();
            assert!((x * 100.0 - f64::from(r[1])).abs() < 1.0, "{r:?}: {x}");
            assert!(close(sum(&s), 1.0));
            if r[0] == 69 {
                let eff = locality_effective_weights(&c)[0].0;
                assert!(close(x, 0.966 / 2.966) && close(eff, 0.966));
            }
        }
    }

    /// Issue cases (a)-(d).
    #[test]
    fn issue_cases() {
        // (a) locality weighted 10:2 over 10 and 2 endpoints; (b) plain: 1/12 each either way.
        assert!(uniform("lw 0/10:10h 0/2:2h", 1.0 / 12.0));
        assert!(uniform("0/10:10h 0/2:2h", 1.0 / 12.0));
        // Endpoint weights 1 and 5: without locality weighting, locality weights are ignored...
        let s = shares(&cl("0/10:10h 0/2:2h*5"));
        assert!(close(s[0][0], 1.0 / 20.0) && close(s[1][0], 5.0 / 20.0));
        // ...with it, zone b keeps its 2/12, split 5:5.
        assert!(uniform("lw 0/10:10h 0/2:2h*5", 1.0 / 12.0));
        // (c) P0 1 of 10 healthy (health 140/10 = 14), P1 all healthy: 14/86.
        check("0:1h,9u 1:10h", &format!("14 86 / {NN}"));
        let s = shares(&cl("0:1h,9u 1:10h"));
        assert!(close(s[0][0], 0.14) && s[0][1] == 0.0 && close(s[1][0], 0.086));
        // (d) P0 half healthy: 70/30.
        check("0:5h,5u 1:10h", &format!("70 30 / {NN}"));
        assert!(close(shares(&cl("0:5h,5u 1:10h"))[0][0], 0.14));
    }

    #[test]
    fn edge_cases() {
        // No endpoints: total panic without hosts -> healthy_load[0] = 100, nothing to pick.
        let empty = priority_state(&cl(""));
        assert_eq!((empty.healthy_load, empty.panic), (vec![100], vec![true]));
        assert!(shares(&cl("")).is_empty());
        // All unhealthy: total panic by host count, every host by weight...
        check("0:3u 1:2u", "60 40 / 0 0 / YY");
        assert!(uniform("0:3u 1:2u", 0.2));
        // ...with panic disabled, 100% "to P0 healthy", which is empty: no traffic at all.
        let c = cl("panic=0 0:3u 1:2u");
        assert_eq!(
            (priority_loads(&c), panic(&c)),
            ((vec![100, 0], vec![0, 0]), vec![false; 2])
        );
        assert_eq!(sum(&shares(&c)), 0.0);
        // [DOC] excluded.rst: P0 {healthy, excluded, excluded}, P1 {healthy, healthy}: all P0.
        check("0:1h,2x 1:2h", &format!("100 0 / {NN}"));
        assert!(close(shares(&cl("0:1h,2x 1:2h"))[0][0], 1.0));
        // Panic picks excluded (draining) hosts too, and ignores localities and their weights.
        assert!(uniform("0:1h,3u,1x", 0.2));
        assert!(uniform("lw 0/1:1h,3u 0:4u", 0.125));
        // Locality weighted with every locality weight unset (0): no scheduler, host weights.
        assert!(uniform("lw 0:2h 0:1h", 1.0 / 3.0));
        // One weighted locality: the unweighted one gets nothing.
        assert_eq!(shares(&cl("lw 0/1:1h 0:5h")), vec![vec![1.0], vec![0.0; 5]]);
        // Degraded scheduler: health 35, degraded 420/8 = 52 -> 40 + 59, remainder 1 to healthy.
        // Healthy localities 0.35 : 0.35; degraded only zone a (min(1, 1.4 * 3/4) = 1).
        let spec = "lw 0/1:1h,3d 0/1:1h,3u";
        check(spec, "41 / 59 / N");
        let e = locality_effective_weights(&cl(spec));
        assert!(close(e[0].0, 0.35) && e[0].1 == 1.0 && close(e[1].0, 0.35) && e[1].1 == 0.0);
        let s = shares(&cl(spec));
        assert!(close(s[0][0], 0.205) && close(s[1][0], 0.205) && close(s[0][1], 0.59 / 3.0));
        // healthy_panic_threshold is truncated, not rounded ([PCT] convertPercent).
        let t = |p: &str| panic_threshold(&cl(&format!("panic={p}")));
        assert_eq!(
            [t("50"), t("50.9"), t("29"), t("0.5"), t("100")],
            [50, 50, 28, 0, 100]
        );
    }

    /// Pseudo-random clusters: loads sum to 100; shares sum to 1 and match each priority's
    /// load, or are all 0.
    #[test]
    fn invariants() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut rnd = |n: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) % n
        };
        for _ in 0..3000 {
            let opts = ["", "lw ", "wph ", "lw wph "][rnd(4) as usize];
            let opf = [140, 100, 200][rnd(3) as usize];
            let mut spec = format!("{opts}opf={opf} panic={}", [50, 0, 100][rnd(3) as usize]);
            for _ in 0..rnd(5) {
                spec += &format!(" {}{}:", rnd(3), ["", "/1", "/3"][rnd(3) as usize]);
                for _ in 0..rnd(6) {
                    let kind = ["h", "d", "u", "x"][rnd(4) as usize];
                    spec += &format!("1{kind}*{},", 1 + rnd(4));
                }
            }
            let st = priority_state(&cl(&spec));
            let loads = st.healthy_load.iter().chain(&st.degraded_load);
            assert_eq!(loads.sum::<u32>(), 100, "{spec}");
            let total = sum(&shares(&cl(&spec)));
            if total != 0.0 {
                check(&spec, &state(&st));
                assert!(close(total, 1.0), "{spec}");
            }
        }
    }
}
