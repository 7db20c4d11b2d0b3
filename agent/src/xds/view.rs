//! What the admin server reads of the core: a view the core publishes after every
//! change, and the datapath task's status, both over `watch` channels. `/readyz`,
//! `/metrics` and `/config_dump` never take the lock the configuration sources
//! hold while they decode, validate and translate an update (seconds for an
//! initial load of 100,000 services).
//!
//! The routing table is not copied into the view: the view holds it weakly. The
//! state changes the table in place only while no reader holds it; a reader that
//! upgrades the view's reference holds the table as it was when the view was
//! published, and a commit meanwhile copies it first (`Arc::make_mut`). A view
//! whose table has since changed no longer upgrades, and a newer view follows it.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Weak},
};

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::watch;

use super::{
    clusters::{DnsAnswers, Place},
    core::{DnsStatus, SourceState},
    decode::Kind,
    state::TypeStats,
};
use crate::{
    admin_types::{ConnectionDump, LimitedDump},
    dataplane::{Limits, task::KernelStatus},
    model::{RoutingTable, ServiceAddr},
};

/// Where a service's assignment places each endpoint, by address and port.
pub type Places = BTreeMap<(IpAddr, u16), Place>;

/// The core as of its last change.
#[derive(Clone, Debug, Default)]
pub struct CoreView {
    pub source: SourceState,
    /// LDS and CDS have been accepted once (the table is the control plane's).
    pub synced: bool,
    pub source_errors: u64,
    pub source_last_error: Option<String>,
    /// Responses of types sockmesh does not consume.
    pub ignored_types: u64,
    pub opaque_types: super::opaque::OpaqueTypes,
    pub unknown_fields: super::unknown::UnknownFields,
    pub connection: ConnectionDump,
    /// Resolution of the DNS clusters resolved so far, by cluster name.
    pub dns_status: BTreeMap<String, DnsStatus>,
    /// The DNS clusters and their last good answers, if any.
    pub dns_answers: BTreeMap<String, Option<DnsAnswers>>,
    pub stats: BTreeMap<Kind, TypeStats>,
    /// Resources standing refused, by kind and name: why.
    pub refused: BTreeMap<Kind, BTreeMap<String, String>>,
    /// Listeners sockmesh leaves alone (some chain, or all), and why.
    pub left_alone: Vec<(String, Vec<String>)>,
    pub warming: Vec<ServiceAddr>,
    pub passthrough: Vec<ServiceAddr>,
    pub unhashable: Vec<(ServiceAddr, &'static str)>,
    /// Services the node programs otherwise than the configuration asks.
    pub limited: Vec<LimitedDump>,
    pub limits: Limits,
    /// Writes handed to the datapath task so far (see [`View::writes_in_flight`]).
    pub sent: u64,
    /// [`Self::sent`] once the first write of the control plane's table was
    /// handed over (0 before): the node is ready when the kernel has handled it.
    pub synced_write: u64,
    /// How many entries each of the agent's collections holds (for leak audits).
    pub state_sizes: BTreeMap<&'static str, usize>,
    /// The place of each endpoint of the services with priority levels, as their
    /// assignments give it (what `/config_dump`'s `load_balancing` labels the
    /// kernel's levels with).
    pub places: Arc<BTreeMap<ServiceAddr, Arc<Places>>>,
    /// The accepted table (see the module's documentation).
    pub table: Weak<RoutingTable>,
}

/// What the admin server holds: the channels the core and the datapath task
/// publish on.
#[derive(Clone, Debug)]
pub struct Viewer {
    core: watch::Receiver<Arc<CoreView>>,
    kernel: watch::Receiver<KernelStatus>,
    latency: Histogram,
}

/// The core's last view and the datapath's status, read together.
#[derive(Clone, Debug)]
pub struct View {
    pub core: Arc<CoreView>,
    /// What the kernel's maps hold (not what the state accepted: they differ while
    /// a kernel write lags or is in flight), pushes, failures, the attachment.
    pub kernel: KernelStatus,
    /// Update arrival → kernel maps written.
    pub latency: Histogram,
}

impl View {
    /// Writes handed to the datapath task that it has not finished yet.
    pub fn writes_in_flight(&self) -> u64 {
        self.core.sent.saturating_sub(self.kernel.handled)
    }
}

impl Viewer {
    pub fn new(
        core: watch::Receiver<Arc<CoreView>>,
        kernel: watch::Receiver<KernelStatus>,
        latency: Histogram,
    ) -> Self {
        Self {
            core,
            kernel,
            latency,
        }
    }

    /// The latest view, without waiting.
    pub fn now(&self) -> View {
        View {
            core: self.core.borrow().clone(),
            kernel: self.kernel.borrow().clone(),
            latency: self.latency.clone(),
        }
    }

    /// The latest view with its table. Waits only while the core is between a
    /// commit and the view that follows it (it publishes before it lets go of the
    /// update); `None` once the core has gone.
    pub async fn with_table(&mut self) -> Option<(View, Arc<RoutingTable>)> {
        loop {
            let core = self.core.borrow_and_update().clone();
            if let Some(table) = core.table.upgrade() {
                let view = View {
                    core,
                    kernel: self.kernel.borrow().clone(),
                    latency: self.latency.clone(),
                };
                return Some((view, table));
            }
            self.core.changed().await.ok()?;
        }
    }
}
