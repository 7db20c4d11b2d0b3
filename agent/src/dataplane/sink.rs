//! The kernel datapath as the datapath task's [`TableSink`]: each call goes to
//! [`super::Datapath`].

use std::{collections::BTreeSet, path::PathBuf};

use super::{
    Attachment, EnrollReport, Limits,
    task::{SinkError, TableSink},
};
use crate::model::{Changes, Endpoint, RoutingTable, Usage};

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
        only: Option<&[sockmesh_common::ServiceKey]>,
    ) -> Result<Option<u64>, SinkError> {
        Ok(super::Datapath::refresh_levels(self, only)?)
    }

    fn published_levels(
        &self,
        only: Option<&BTreeSet<crate::model::ServiceAddr>>,
        previous: &super::published::PublishedMap,
    ) -> super::published::PublishedMap {
        super::Datapath::published_levels(self, only, previous)
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
