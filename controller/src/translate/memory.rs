//! The service and name maps held in memory: the map writer's target in
//! the unit tests and the control-plane benchmark, which need no root and no
//! BPF object. The root tests (`tests/sync.rs`, `tests/*_test_run.rs`) check
//! the same writes on the real maps.

use std::{collections::BTreeMap, net::SocketAddr};

use super::sync::{BackendSlots, Frontend, ProgrammedServices, ServiceMaps};
use crate::error::Result;

/// The service and name maps, in memory, with a log of every write.
#[derive(Default)]
pub struct MemoryMaps {
    pub frontends: BTreeMap<Frontend, (u32, BackendSlots)>,
    pub backends: BTreeMap<u32, (SocketAddr, u8, bool)>,
    pub names: BTreeMap<(u32, u32), String>,
    /// One line per write, in order.
    pub writes: Vec<String>,
}

impl ServiceMaps for MemoryMaps {
    fn set_backend(&mut self, id: u32, addr: SocketAddr, protocol: u8, term: bool) -> Result<()> {
        self.writes.push(format!("backend {id} = {addr}"));
        self.backends.insert(id, (addr, protocol, term));
        Ok(())
    }
    fn remove_backend(&mut self, id: u32) -> Result<()> {
        self.writes.push(format!("backend {id} removed"));
        self.backends.remove(&id);
        Ok(())
    }
    fn set_service(&mut self, f: &Frontend, service_id: u32, slots: &BackendSlots) -> Result<()> {
        self.writes
            .push(format!("service {} = {service_id}", f.addr));
        self.frontends.insert(*f, (service_id, slots.clone()));
        Ok(())
    }
    fn remove_service(&mut self, f: &Frontend) -> Result<()> {
        self.writes.push(format!("service {} removed", f.addr));
        self.frontends.remove(f);
        Ok(())
    }
    fn set_name(&mut self, kind: u32, id: u32, name: &str) -> Result<()> {
        self.names.insert((kind, id), name.to_string());
        Ok(())
    }
    fn remove_name(&mut self, kind: u32, id: u32) -> Result<()> {
        self.names.remove(&(kind, id));
        Ok(())
    }
    fn read_services(&mut self) -> Result<ProgrammedServices> {
        Ok(ProgrammedServices {
            frontends: self.frontends.clone(),
            backends: self.backends.clone(),
        })
    }
}
