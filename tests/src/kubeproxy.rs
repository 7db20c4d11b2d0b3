//! kube-proxy's datapaths, for side-by-side benchmarks: the iptables mode's rule
//! layout (KUBE-SERVICES → KUBE-SVC-* → KUBE-SEP-* with statistic-mode DNAT) and
//! the nftables mode's (a verdict map from ip . proto . port to per-service chains
//! that pick an endpoint chain with `numgen random`). Same services and endpoints
//! as `mesh::services`: `10.200.x.y:80` → `10.30.x.y:8080..`. Rules are only ever
//! loaded inside a namespace the caller created.

use std::{fmt::Write as _, io::Write as _, process::Stdio, time::Duration};

use crate::NetNs;

fn vip(i: u32) -> String {
    let [_, _, hi, lo] = i.to_be_bytes();
    format!("10.200.{hi}.{lo}")
}

fn endpoint(i: u32, p: u16) -> String {
    let [_, _, hi, lo] = i.to_be_bytes();
    format!("10.30.{hi}.{lo}:{}", 8080 + p)
}

fn svc_chain(i: u32) -> String {
    format!("KUBE-SVC-{i:016X}")
}

/// Endpoint chain names carry a generation so a changed endpoint gets a new chain,
/// as kube-proxy's hash of the endpoint does.
fn sep_chain(i: u32, p: u16, generation: u32) -> String {
    format!("KUBE-SEP-{i:08X}{generation:04X}{p:04X}")
}

/// The statistic-mode jumps of one service with `n` endpoints (kube-proxy's
/// probabilities 1/n, 1/(n-1), ..., last unconditional).
fn svc_rules(out: &mut String, i: u32, eps: &[(String, String)]) {
    let n = eps.len();
    for (k, (chain, _)) in eps.iter().enumerate() {
        let left = n - k;
        if left > 1 {
            let _ = writeln!(
                out,
                "-A {} -m comment --comment \"default/svc-{i}:http\" -m statistic --mode random --probability {:.11} -j {chain}",
                svc_chain(i),
                1.0 / left as f64
            );
        } else {
            let _ = writeln!(
                out,
                "-A {} -m comment --comment \"default/svc-{i}:http\" -j {chain}",
                svc_chain(i)
            );
        }
    }
}

fn sep_rules(out: &mut String, i: u32, chain: &str, ep: &str) {
    let _ = writeln!(
        out,
        "-A {chain} -m comment --comment \"default/svc-{i}:http\" -p tcp -m tcp -j DNAT --to-destination {ep}"
    );
}

/// The full `nat` table for `services` × `per` endpoints (iptables-restore input).
pub fn iptables_ruleset(services: u32, per: u16) -> String {
    iptables_ruleset_with(services, per, None)
}

/// As [`iptables_ruleset`], plus one real service `vip` (any port) → `dest` (port
/// kept) whose KUBE-SERVICES rule sits in the middle of the list, where an average
/// service's does.
pub fn iptables_ruleset_with(services: u32, per: u16, real: Option<(&str, &str)>) -> String {
    let mut chains = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n",
    );
    let mut rules = String::from(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    for i in 0..services {
        if let Some((vip, dest)) = real.filter(|_| i == services / 2) {
            chains.push_str(":KUBE-SVC-REAL - [0:0]\n:KUBE-SEP-REAL - [0:0]\n");
            let _ = writeln!(
                rules,
                "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"default/real cluster IP\" -j KUBE-SVC-REAL"
            );
            rules.push_str(
                "-A KUBE-SVC-REAL -m comment --comment \"default/real\" -j KUBE-SEP-REAL\n",
            );
            let _ = writeln!(
                rules,
                "-A KUBE-SEP-REAL -m comment --comment \"default/real\" -p tcp -j DNAT --to-destination {dest}"
            );
        }
        let _ = writeln!(chains, ":{} - [0:0]", svc_chain(i));
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"default/svc-{i}:http cluster IP\" -m tcp --dport 80 -j {}",
            vip(i),
            svc_chain(i)
        );
        let eps: Vec<(String, String)> = (0..per)
            .map(|p| (sep_chain(i, p, 0), endpoint(i, p)))
            .collect();
        for (chain, ep) in &eps {
            let _ = writeln!(chains, ":{chain} - [0:0]");
            sep_rules(&mut rules, i, chain, ep);
        }
        svc_rules(&mut rules, i, &eps);
    }
    chains.push_str(&rules);
    chains.push_str("COMMIT\n");
    chains
}

/// What kube-proxy writes with `iptables-restore --noflush` when service `i` moves
/// from its `per` endpoints of generation `old` to the single endpoint `new_ep`:
/// the service chain is re-declared (flushed) and refilled, the new endpoint chain
/// created, the old ones flushed and deleted.
pub fn iptables_change(i: u32, per: u16, old: u32, generation: u32, new_ep: &str) -> String {
    let mut out = String::from("*nat\n");
    let new_chain = sep_chain(i, 0, generation);
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(i));
    let _ = writeln!(out, ":{new_chain} - [0:0]");
    let old_chains: Vec<String> = (0..per).map(|p| sep_chain(i, p, old)).collect();
    for c in &old_chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    sep_rules(&mut out, i, &new_chain, new_ep);
    svc_rules(&mut out, i, &[(new_chain.clone(), new_ep.to_owned())]);
    for c in &old_chains {
        let _ = writeln!(out, "-X {c}");
    }
    out.push_str("COMMIT\n");
    out
}

fn nft_svc(i: u32) -> String {
    format!("service-{i:08x}-default/svc-{i}/tcp/http")
}

fn nft_ep(i: u32, p: u16, generation: u32) -> String {
    format!("endpoint-{i:08x}{generation:04x}{p:04x}")
}

fn nft_svc_rule(i: u32, eps: &[String]) -> String {
    let map: Vec<String> = eps
        .iter()
        .enumerate()
        .map(|(k, c)| format!("{k} : goto {c}"))
        .collect();
    format!(
        "add rule ip kube-proxy {} numgen random mod {} vmap {{ {} }}\n",
        nft_svc(i),
        eps.len(),
        map.join(" , ")
    )
}

/// kube-proxy's nftables-mode layout for `services` × `per` (an `nft -f` script).
pub fn nft_ruleset(services: u32, per: u16) -> String {
    let mut out = String::from(
        "add table ip kube-proxy\n\
         add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n\
         add chain ip kube-proxy services\n\
         add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n\
         add rule ip kube-proxy nat-output jump services\n",
    );
    for i in 0..services {
        let eps: Vec<String> = (0..per).map(|p| nft_ep(i, p, 0)).collect();
        for (p, c) in eps.iter().enumerate() {
            let _ = writeln!(out, "add chain ip kube-proxy {c}");
            let _ = writeln!(
                out,
                "add rule ip kube-proxy {c} meta l4proto tcp dnat to {}",
                endpoint(i, u16::try_from(p).unwrap_or(0))
            );
        }
        let _ = writeln!(out, "add chain ip kube-proxy {}", nft_svc(i));
        out.push_str(&nft_svc_rule(i, &eps));
        let _ = writeln!(
            out,
            "add element ip kube-proxy service-ips {{ {} . tcp . 80 : goto {} }}",
            vip(i),
            nft_svc(i)
        );
    }
    out
}

/// One nft transaction moving service `i` to the single endpoint `new_ep`, as
/// kube-proxy's nftables mode does: new endpoint chain, service chain flushed and
/// refilled, old endpoint chains deleted.
pub fn nft_change(i: u32, per: u16, old: u32, generation: u32, new_ep: &str) -> String {
    let new_chain = nft_ep(i, 0, generation);
    let mut out = format!(
        "add chain ip kube-proxy {new_chain}\nadd rule ip kube-proxy {new_chain} meta l4proto tcp dnat to {new_ep}\nflush chain ip kube-proxy {}\n",
        nft_svc(i)
    );
    out.push_str(&nft_svc_rule(i, &[new_chain]));
    for p in 0..per {
        let _ = writeln!(out, "delete chain ip kube-proxy {}", nft_ep(i, p, old));
    }
    out
}

/// Runs `program args` inside `netns` with `input` on stdin; returns the wall time.
pub fn run_in(
    netns: &NetNs,
    program: &str,
    args: &[&str],
    input: &str,
) -> Result<Duration, String> {
    let started = std::time::Instant::now();
    // setns in the child (no `ip netns exec`, which remounts /sys and would add
    // milliseconds that are not the datapath's).
    let mut child = crate::command_in(netns, None, program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("{program} stdin: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let took = started.elapsed();
    if !out.status.success() {
        return Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .take(3)
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    Ok(took)
}
