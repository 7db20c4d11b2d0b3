//! The xDS side: decoding Envoy resources, translating them into the routing table,
//! and the sources that deliver them (ADS over gRPC, files, REST-JSON).

pub mod accept;
pub mod ads;
pub mod auth;
pub mod clusters;
pub mod core;
pub mod decode;
pub mod dns;
pub mod file;
pub mod filedoc;
pub mod fit;
pub mod grpc;
pub mod incremental;
pub mod json_wire;
pub mod node;
pub mod opaque;
pub mod outlier;
pub mod position;
pub mod requests;
pub mod resources;
pub mod rest;
pub mod state;
pub mod translate;
pub mod unknown;
pub mod users;
pub mod validate;
pub mod view;

/// `f` over `items` in order: on one thread below `from` items, else in one chunk
/// per core (at most 8), the results in the items' order. A panic on a chunk's
/// thread goes on in the caller, as it would have on one thread.
pub(crate) fn in_chunks<T: Sync, R: Send>(
    items: &[T],
    from: usize,
    f: impl Fn(&[T]) -> R + Sync,
) -> Vec<R> {
    let threads = if items.len() < from {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
    };
    if threads == 1 {
        return vec![f(items)];
    }
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(items.len().div_ceil(threads))
            .map(|part| s.spawn(move || f(part)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

#[cfg(test)]
mod full;
#[cfg(test)]
mod tests;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod fuzz_mesh;
