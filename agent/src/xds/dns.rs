//! Host-name resolution for `STRICT_DNS` and `LOGICAL_DNS` clusters, as Envoy
//! does it (`strict_dns_cluster.cc`, `logical_dns_cluster.cc`):
//!
//! - every host name of the cluster's endpoints is resolved by the cluster's own
//!   resolvers (`typed_dns_resolver_config` / `dns_resolvers`), else by the
//!   node's `/etc/resolv.conf` (search domains and `ndots` included);
//! - `dns_lookup_family` picks A and/or AAAA queries ([`strategy`]);
//! - it is resolved again every `dns_refresh_rate`, or when the answer's TTL runs
//!   out with `respect_dns_ttl`; after a failure, every
//!   `dns_failure_refresh_rate`, backing off ([`next_refresh`]);
//! - a failure (timeout, SERVFAIL, REFUSED, no reachable server) keeps the last
//!   good addresses and is counted; "no such name" and "no records" are answers
//!   (the name has no addresses now), as Envoy's
//!   `dns_nodata_noname_is_success` has it. The first attempt of a host that
//!   fails leaves it with no address, so the cluster initializes (Envoy's cluster
//!   warms until each name's first resolution completes, whatever its outcome).
//!
//! One task per DNS cluster; it never holds the core while it waits on the
//! network, and xDS handling never waits on DNS: answers go into the state
//! through [`Core::handle_dns`] like any other update.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig},
    net::{NetError, runtime::TokioRuntimeProvider},
};
use tokio::{sync::watch, task::JoinSet};
use tracing::{debug, info, warn};

use super::{
    clusters::{DnsAnswers, DnsFamily, DnsTarget},
    core::Core,
};

/// The resolver's per-query timeout and attempts (c-ares' defaults in Envoy:
/// 5 s, 4 tries; a refresh fails sooner here so the next one is not delayed).
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const QUERY_ATTEMPTS: usize = 2;

/// A resolution that failed: which host, and why.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("reading the node's resolver configuration (/etc/resolv.conf): {0}")]
    SystemConfig(NetError),
    #[error("building the resolver: {0}")]
    Build(NetError),
    #[error("resolving {host:?}: {source}")]
    Lookup { host: String, source: NetError },
}

/// What one round of resolution of a cluster found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Hosts answered (possibly with no address: no such name / no records).
    pub answered: DnsAnswers,
    /// Hosts whose resolution failed, with the reason.
    pub failed: BTreeMap<String, String>,
    /// The smallest TTL among the answers, if any address came back.
    pub ttl: Option<Duration>,
}

impl Round {
    /// `previous` updated with this round: answered hosts replaced, failed hosts
    /// keep their last good addresses (none if they never had any). While nothing
    /// is known of any host (every one failed, none ever answered) there are no
    /// answers at all, so the cluster keeps warming and its services keep what
    /// they had: after an agent restart during a DNS outage, the backends the
    /// kernel still holds.
    pub fn merge_into(&self, previous: &DnsAnswers, hosts: &[String]) -> DnsAnswers {
        let known = |h: &String| self.answered.contains_key(h) || previous.contains_key(h);
        if !hosts.iter().any(known) {
            return DnsAnswers::new();
        }
        hosts
            .iter()
            .map(|h| {
                let addrs = self
                    .answered
                    .get(h)
                    .or_else(|| previous.get(h))
                    .cloned()
                    .unwrap_or_default();
                (h.clone(), addrs)
            })
            .collect()
    }
}

/// How `dns_lookup_family` maps to queries. AUTO: AAAA, A if no AAAA;
/// V4_PREFERRED: A, AAAA if no A; ALL: both.
pub fn strategy(family: DnsFamily) -> LookupIpStrategy {
    match family {
        DnsFamily::Auto => LookupIpStrategy::Ipv6thenIpv4,
        DnsFamily::V4Only => LookupIpStrategy::Ipv4Only,
        DnsFamily::V6Only => LookupIpStrategy::Ipv6Only,
        DnsFamily::V4Preferred => LookupIpStrategy::Ipv4thenIpv6,
        DnsFamily::All => LookupIpStrategy::Ipv4AndIpv6,
    }
}

/// When to resolve again: after a round with a failure, `failure_base` doubled per
/// consecutive failed round up to `failure_max`; else the answer's TTL with
/// `respect_dns_ttl` (when it has one), else `dns_refresh_rate`.
pub fn next_refresh(target: &DnsTarget, round: &Round, failed_rounds: u32) -> Duration {
    if !round.failed.is_empty() {
        let doublings = failed_rounds.saturating_sub(1).min(16);
        return target
            .failure_base
            .saturating_mul(1 << doublings)
            .min(target.failure_max);
    }
    match round.ttl {
        Some(ttl) if target.respect_ttl && !ttl.is_zero() => ttl,
        _ => target.refresh,
    }
}

/// A resolver for `target`: its own name servers (UDP, TCP when truncated), or
/// the node's `/etc/resolv.conf`. Nothing is cached: every refresh asks.
pub fn resolver(target: &DnsTarget) -> Result<TokioResolver, DnsError> {
    let mut builder = if target.resolvers.is_empty() {
        TokioResolver::builder_tokio().map_err(DnsError::SystemConfig)?
    } else {
        let servers = target
            .resolvers
            .iter()
            .map(|a| {
                let mut udp = ConnectionConfig::udp();
                udp.port = a.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = a.port();
                NameServerConfig::new(a.ip(), true, vec![udp, tcp])
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    let opts = builder.options_mut();
    opts.ip_strategy = strategy(target.family);
    opts.cache_size = 0;
    opts.timeout = QUERY_TIMEOUT;
    opts.attempts = QUERY_ATTEMPTS;
    builder.build().map_err(DnsError::Build)
}

/// Resolves every host of `target` at once.
pub async fn resolve(resolver: &TokioResolver, target: &DnsTarget) -> Round {
    let mut set = JoinSet::new();
    for host in &target.hosts {
        let resolver = resolver.clone();
        let host = host.clone();
        set.spawn(async move {
            let result = resolver.lookup_ip(host.as_str()).await;
            (host, result)
        });
    }
    let mut round = Round::default();
    while let Some(joined) = set.join_next().await {
        let Ok((host, result)) = joined else {
            continue;
        };
        match result {
            Ok(lookup) => {
                let mut addrs: Vec<IpAddr> = lookup.iter().collect();
                addrs.dedup();
                let ttl = lookup
                    .valid_until()
                    .saturating_duration_since(Instant::now());
                if !addrs.is_empty() {
                    round.ttl = Some(round.ttl.map_or(ttl, |t| t.min(ttl)));
                }
                round.answered.insert(host, addrs);
            }
            Err(e) if e.is_no_records_found() => {
                round.answered.insert(host, Vec::new());
            }
            Err(e) => {
                let e = DnsError::Lookup {
                    host: host.clone(),
                    source: e,
                };
                round.failed.insert(host, e.to_string());
            }
        }
    }
    round
}

/// Follows the DNS clusters `targets` names until `stop`: one task per cluster,
/// restarted when its target changes, ended when the cluster goes.
pub async fn run(
    core: Arc<Mutex<Core>>,
    mut targets: watch::Receiver<BTreeMap<String, DnsTarget>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tasks: BTreeMap<String, (DnsTarget, tokio::task::AbortHandle)> = BTreeMap::new();
    let mut set = JoinSet::new();
    loop {
        let want = targets.borrow_and_update().clone();
        tasks.retain(|name, (target, task)| {
            // A task that ended (it never returns, so it panicked) is started again.
            let keep = want.get(name) == Some(target) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for (name, target) in want {
            if tasks.contains_key(&name) {
                continue;
            }
            debug!(cluster = %name, hosts = ?target.hosts, "following a DNS cluster");
            let task = set.spawn(follow(name.clone(), target.clone(), core.clone()));
            tasks.insert(name, (target, task));
        }
        tokio::select! {
            changed = targets.changed() => if changed.is_err() { break },
            _ = stop.changed() => break,
            // Reap finished tasks so the set does not grow; one that panicked is
            // restarted by the next pass.
            Some(joined) = set.join_next(), if !set.is_empty() => {
                if let Err(e) = joined && e.is_panic() {
                    tracing::error!(error = %e, "a DNS cluster's resolver task panicked; restarting it");
                }
            }
        }
    }
    set.abort_all();
}

/// Resolves one cluster's host names, every refresh, into the core.
async fn follow(cluster: String, target: DnsTarget, core: Arc<Mutex<Core>>) {
    let hosts: Vec<String> = target.hosts.iter().cloned().collect();
    let resolver = loop {
        match resolver(&target) {
            Ok(r) => break r,
            Err(e) => {
                // Nothing can be resolved without a resolver: every host fails
                // (counted, last good addresses kept) until it can be built.
                let round = Round {
                    failed: hosts.iter().map(|h| (h.clone(), e.to_string())).collect(),
                    ..Round::default()
                };
                report(&core, &cluster, &target, &hosts, &round);
                tokio::time::sleep(target.failure_max).await;
            }
        }
    };
    let mut failed_rounds = 0u32;
    loop {
        let round = resolve(&resolver, &target).await;
        if round.failed.is_empty() {
            failed_rounds = 0;
        } else {
            failed_rounds = failed_rounds.saturating_add(1);
        }
        report(&core, &cluster, &target, &hosts, &round);
        tokio::time::sleep(next_refresh(&target, &round, failed_rounds)).await;
    }
}

fn report(core: &Mutex<Core>, cluster: &str, target: &DnsTarget, hosts: &[String], round: &Round) {
    crate::xds::core::locked(core, |core| {
        report_locked(core, cluster, target, hosts, round);
    });
}

fn report_locked(
    core: &mut Core,
    cluster: &str,
    target: &DnsTarget,
    hosts: &[String],
    round: &Round,
) {
    let previous = core
        .state()
        .dns_answers(cluster)
        .cloned()
        .unwrap_or_default();
    let answers = round.merge_into(&previous, hosts);
    for (host, why) in &round.failed {
        if previous.contains_key(host) {
            warn!(cluster, host, error = %why, "DNS resolution failed; keeping the last good addresses");
        } else {
            warn!(cluster, host, error = %why, "DNS resolution failed; no addresses yet");
        }
    }
    if answers != previous {
        info!(cluster, ?answers, "DNS answers changed");
    }
    core.handle_dns(cluster, target, answers, round, Instant::now());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> DnsTarget {
        DnsTarget {
            hosts: ["a.example".to_owned(), "b.example".to_owned()].into(),
            family: DnsFamily::Auto,
            refresh: Duration::from_secs(5),
            respect_ttl: false,
            failure_base: Duration::from_secs(1),
            failure_max: Duration::from_secs(10),
            resolvers: Vec::new(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_failed_host_keeps_its_last_good_addresses_and_a_new_one_gets_none() {
        let hosts = vec!["a.example".to_owned(), "b.example".to_owned()];
        let previous: DnsAnswers = [("a.example".to_owned(), vec![ip("10.0.0.1")])].into();
        let round = Round {
            answered: [("b.example".to_owned(), vec![ip("10.0.0.2")])].into(),
            failed: [("a.example".to_owned(), "timeout".to_owned())].into(),
            ttl: None,
        };
        assert_eq!(
            round.merge_into(&previous, &hosts),
            [
                ("a.example".to_owned(), vec![ip("10.0.0.1")]),
                ("b.example".to_owned(), vec![ip("10.0.0.2")]),
            ]
            .into()
        );
        // A first round where one host answers: the failed one gets no address,
        // and every host is present, so the cluster initializes.
        let first = Round {
            answered: [("b.example".to_owned(), vec![ip("10.0.0.2")])].into(),
            failed: [("a.example".to_owned(), "timeout".to_owned())].into(),
            ttl: None,
        };
        assert_eq!(
            first.merge_into(&DnsAnswers::new(), &hosts),
            [
                ("a.example".to_owned(), vec![]),
                ("b.example".to_owned(), vec![ip("10.0.0.2")])
            ]
            .into()
        );
        // Nothing known of any host (all failed, none ever answered): no answers,
        // the cluster keeps warming and its services what they had.
        let outage = Round {
            failed: [
                ("a.example".to_owned(), "timeout".to_owned()),
                ("b.example".to_owned(), "SERVFAIL".to_owned()),
            ]
            .into(),
            ..Round::default()
        };
        assert_eq!(
            outage.merge_into(&DnsAnswers::new(), &hosts),
            DnsAnswers::new()
        );
        // "No such name" is an answer: the cluster initializes with no address.
        let gone = Round {
            answered: [("a.example".to_owned(), vec![])].into(),
            failed: [("b.example".to_owned(), "timeout".to_owned())].into(),
            ttl: None,
        };
        assert_eq!(
            gone.merge_into(&DnsAnswers::new(), &hosts),
            [
                ("a.example".to_owned(), vec![]),
                ("b.example".to_owned(), vec![])
            ]
            .into()
        );
    }

    #[test]
    fn an_answer_with_no_addresses_replaces_the_last_good_ones() {
        let hosts = vec!["a.example".to_owned()];
        let previous: DnsAnswers = [("a.example".to_owned(), vec![ip("10.0.0.1")])].into();
        let round = Round {
            answered: [("a.example".to_owned(), vec![])].into(),
            ..Round::default()
        };
        assert_eq!(
            round.merge_into(&previous, &hosts)["a.example"],
            Vec::<IpAddr>::new()
        );
    }

    #[test]
    fn refresh_follows_the_rate_the_ttl_and_backs_off_on_failure() {
        let mut t = target();
        let ok = Round {
            ttl: Some(Duration::from_secs(30)),
            ..Round::default()
        };
        assert_eq!(next_refresh(&t, &ok, 0), Duration::from_secs(5));
        t.respect_ttl = true;
        assert_eq!(next_refresh(&t, &ok, 0), Duration::from_secs(30));
        let no_ttl = Round::default();
        assert_eq!(
            next_refresh(&t, &no_ttl, 0),
            Duration::from_secs(5),
            "no address, no TTL: the refresh rate"
        );
        let failed = Round {
            failed: [("a.example".to_owned(), "timeout".to_owned())].into(),
            ..Round::default()
        };
        let backoff: Vec<u64> = (1..=6)
            .map(|n| next_refresh(&t, &failed, n).as_secs())
            .collect();
        assert_eq!(backoff, [1, 2, 4, 8, 10, 10]);
        assert_eq!(next_refresh(&t, &failed, u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn lookup_family_maps_to_envoys_query_order() {
        assert_eq!(strategy(DnsFamily::Auto), LookupIpStrategy::Ipv6thenIpv4);
        assert_eq!(
            strategy(DnsFamily::V4Preferred),
            LookupIpStrategy::Ipv4thenIpv6
        );
        assert_eq!(strategy(DnsFamily::All), LookupIpStrategy::Ipv4AndIpv6);
        assert_eq!(strategy(DnsFamily::V4Only), LookupIpStrategy::Ipv4Only);
        assert_eq!(strategy(DnsFamily::V6Only), LookupIpStrategy::Ipv6Only);
    }
}
