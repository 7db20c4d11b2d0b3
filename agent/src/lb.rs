//! Backend selection tables: what the kernel picks from.
//!
//! - [`weighted_slots`]: a weighted-random (and least-connections) service's slots,
//!   each backend owning slots in proportion to its weight;
//! - [`maglev_table`]: a consistent-hash service's Maglev lookup table;
//! - [`levels`]: Envoy's priority and locality arithmetic over a load assignment,
//!   and the slot ranges of a service served by priority levels.

pub mod levels;
mod maglev;
mod slots;

pub use maglev::{MaglevKey, is_prime, maglev_table, table_size_problem};
pub use slots::{slot_count, weighted_slots, weighted_slots_capped};
