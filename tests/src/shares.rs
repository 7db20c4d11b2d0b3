//! Each endpoint's share of a service's new connections as the kernel's maps hold
//! it, read as a connect() resolves them: for a service with priority levels, the
//! published generation's choice table (one entry per percent of the draw) names a
//! slot range; otherwise all the service's slots; then each slot of the range
//! names a backend. Ejections are not taken into account (nothing is ejected
//! where this is used).

use std::{collections::BTreeMap, fmt::Debug, net::IpAddr};

use sockmesh::{
    dataplane::{service_key, words_to_ip},
    model::ServiceAddr,
};
use sockmesh_common::{
    BackendInfo,
    resolve::{RoutingMaps, Slot, resolve_slot, tiers_key},
    service_flags, tiers,
};

/// Endpoints (address, port) and their shares of new connections (0..=1).
pub type Shares = BTreeMap<(IpAddr, u16), f64>;

/// `service`'s endpoints and their shares in `maps`; `None` if the
/// service is not in them. An error says what did not resolve (an update raced
/// the read).
pub fn kernel_shares<M>(maps: &M, service: &ServiceAddr) -> Result<Option<Shares>, String>
where
    M: RoutingMaps<Backend = BackendInfo>,
    M::Error: Debug,
{
    let Some(value) = maps
        .service(&service_key(service))
        .map_err(|e| format!("{service}: {e:?}"))?
    else {
        return Ok(None);
    };
    let mut out = BTreeMap::new();
    let mut spread = |start: u32, len: u32, amount: f64| -> Result<(), String> {
        for s in start..start + len {
            match resolve_slot(maps, &value, s).map_err(|e| format!("{service}: {e:?}"))? {
                Slot::Backend(b) => {
                    let key = (words_to_ip(b.addr), u16::from_be(b.port));
                    *out.entry(key).or_insert(0.0) += amount / f64::from(len);
                }
                Slot::Missing(k) => return Err(format!("{service}: slot {k:?} does not resolve")),
            }
        }
        Ok(())
    };
    if value.flags & service_flags::TIERS == 0 {
        spread(0, value.slot_count, 1.0)?;
        return Ok(Some(out));
    }
    let t = maps
        .with_tiers(&tiers_key(&value), |t| *t)
        .map_err(|e| format!("{service}: {e:?}"))?
        .ok_or_else(|| format!("{service}: its levels are not published"))?;
    for r in 0..100 {
        if let Some((range, _)) = tiers::range_of(&t, t.choice[r]) {
            spread(u32::from(range.start), u32::from(range.len), 0.01)?;
        }
    }
    Ok(Some(out))
}
