//! Where the datapath task hands accepted tables: the kernel datapath, or a
//! fake in tests.

use std::{collections::BTreeSet, path::PathBuf};

use super::{Attachment, EnrollReport, Limits, task::SinkError};
use crate::model::{Changes, Endpoint, RoutingTable, Usage};

/// Where accepted tables go: the kernel datapath, or a fake in tests.
pub trait TableSink: Send {
    /// Makes the datapath hold `table`; returns the number of map operations.
    fn apply(&mut self, table: &RoutingTable) -> Result<usize, SinkError>;
    /// Changes some services only (`None`: remove).
    fn apply_changes(&mut self, changes: &Changes) -> Result<usize, SinkError>;
    /// What the datapath holds now (adopted from pins on restart).
    fn table(&self) -> RoutingTable;
    /// What the datapath's maps hold, counted (cheap: for gauges).
    fn usage(&self) -> Usage {
        Usage::of_table(&self.table())
    }
    /// The maps' capacities (updates beyond them are NACKed).
    fn limits(&self) -> Limits {
        Limits::default()
    }
    /// How full each map is; with `recount`, the maps the kernel programs fill
    /// are counted again if their turn has come (the task's tick).
    fn map_fill(&mut self, _recount: bool) -> Vec<super::fill::MapFill> {
        super::fill::from_usage(&self.usage(), &self.limits())
    }
    /// Aborts sockets redirected to removed endpoints; returns how many.
    fn terminate(&mut self, _targets: &BTreeSet<Endpoint>) -> Result<usize, SinkError> {
        Ok(0)
    }
    /// Whether the datapath is built but not attached yet, because another pin
    /// layout's datapath serves meanwhile (an upgrade that changed the map layout).
    fn pending(&self) -> bool {
        false
    }
    /// Attaches a pending datapath and removes the other layout's; returns the
    /// layout versions retired.
    fn activate(&mut self) -> Result<Vec<u32>, SinkError> {
        Ok(Vec::new())
    }
    /// How the programs came to be attached (`None`: a sink without a kernel).
    fn attachment(&self) -> Option<Attachment> {
        None
    }
    /// The other pin layouts this datapath detached and removed.
    fn retired(&self) -> Vec<u32> {
        Vec::new()
    }
    /// Deletes idle open-connection counts of endpoints gone; returns how many.
    fn sweep_conns(&mut self) -> Result<usize, SinkError> {
        Ok(0)
    }
    /// Deletes health entries of endpoints their service no longer has; returns
    /// how many.
    fn sweep_endpoint_health(&mut self) -> Result<usize, SinkError> {
        Ok(0)
    }
    /// The kernel's outlier state (`None`: a sink without a kernel).
    fn health(&self) -> Option<super::HealthReport> {
        None
    }
    /// Rewrites the choice tables of services with priority levels to the
    /// ejections running now (all of them, or `only`); returns when the first
    /// of those ejections ends (`CLOCK_MONOTONIC` ns).
    fn refresh_levels(
        &mut self,
        _only: Option<&sockmesh_common::ServiceKey>,
    ) -> Result<Option<u64>, SinkError> {
        Ok(None)
    }
    /// The kernel programs' events (ejections), handed over once to the thread
    /// that reads them.
    fn take_events(&mut self) -> Option<super::events::Events> {
        None
    }

    /// Makes the enrolled cgroups `cgroups` (see [`super::Datapath::enroll`]).
    fn enroll(
        &mut self,
        _cgroups: &BTreeSet<PathBuf>,
        _prune: bool,
    ) -> Result<EnrollReport, SinkError> {
        Err(SinkError::Datapath(super::DataplaneError::NotEnrolling))
    }
}

impl TableSink for super::Datapath {
    fn apply(&mut self, table: &RoutingTable) -> Result<usize, SinkError> {
        Ok(super::Datapath::apply(self, table)?.map_ops)
    }

    fn apply_changes(&mut self, changes: &Changes) -> Result<usize, SinkError> {
        Ok(super::Datapath::apply_changes(self, changes)?.map_ops)
    }

    fn table(&self) -> RoutingTable {
        super::Datapath::table(self)
    }

    fn limits(&self) -> Limits {
        super::Datapath::limits(self)
    }

    fn usage(&self) -> Usage {
        super::Datapath::usage(self)
    }

    fn map_fill(&mut self, recount: bool) -> Vec<super::fill::MapFill> {
        super::Datapath::map_fill(self, recount)
    }

    fn terminate(&mut self, targets: &BTreeSet<Endpoint>) -> Result<usize, SinkError> {
        Ok(super::Datapath::terminate(self, targets)?.destroyed)
    }

    fn pending(&self) -> bool {
        self.is_pending()
    }

    fn activate(&mut self) -> Result<Vec<u32>, SinkError> {
        Ok(super::Datapath::activate(self)?
            .map(|m| m.retired)
            .unwrap_or_default())
    }

    fn attachment(&self) -> Option<Attachment> {
        Some(super::Datapath::attachment(self))
    }

    fn retired(&self) -> Vec<u32> {
        super::Datapath::retired(self).to_vec()
    }

    fn sweep_conns(&mut self) -> Result<usize, SinkError> {
        Ok(super::Datapath::sweep_conns(self)?)
    }

    fn sweep_endpoint_health(&mut self) -> Result<usize, SinkError> {
        Ok(super::Datapath::sweep_endpoint_health(self)?)
    }

    fn health(&self) -> Option<super::HealthReport> {
        super::Datapath::health(self).ok()
    }

    fn refresh_levels(
        &mut self,
        only: Option<&sockmesh_common::ServiceKey>,
    ) -> Result<Option<u64>, SinkError> {
        Ok(super::Datapath::refresh_levels(self, only)?)
    }

    fn take_events(&mut self) -> Option<super::events::Events> {
        super::Datapath::take_events(self)
    }

    fn enroll(
        &mut self,
        cgroups: &BTreeSet<PathBuf>,
        prune: bool,
    ) -> Result<EnrollReport, SinkError> {
        Ok(super::Datapath::enroll(self, cgroups, prune)?)
    }
}
