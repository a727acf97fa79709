//! The pass-through filter's bit sets (`common::prefilter`), from the
//! agent's side: bits are set before what they admit is written, and at
//! start from the state adopted, then the filter is turned on.

use std::net::SocketAddr;

use aya::maps::{Array, HashMap, MapData};
use common::{
    addr::addr16,
    map_names,
    prefilter::{backend_slot, frontend_slot, ENABLED_WORD},
    Backend, ServiceKey, ServiceValue,
};

use super::loader::Datapath;
use crate::error::{Error, Result};

/// How many bits a fill set, for the agent's log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filled {
    pub frontend_addresses: usize,
    pub backends: usize,
    pub conntrack_entries: usize,
}

impl Datapath {
    /// Sets the word holding `slot`'s bit, unless it already has it (the
    /// copy in `self.prefilter` saves the syscall).
    fn prefilter_set(&mut self, (word, bit): (u32, u64)) -> Result<()> {
        let Some(w) = self.prefilter.get_mut(word as usize) else {
            return Ok(());
        };
        if *w & bit != 0 {
            return Ok(());
        }
        let value = *w | bit;
        let mut map: Array<&mut MapData, u64> = self.map_mut(map_names::PREFILTER)?;
        map.set(word, value, 0).map_err(|source| Error::Map {
            name: map_names::PREFILTER,
            source,
        })?;
        self.prefilter[word as usize] = value;
        Ok(())
    }

    /// Admits a service address; before its wildcard entry is written.
    pub(crate) fn prefilter_frontend(&mut self, addr: &[u8; 16]) -> Result<()> {
        self.prefilter_set(frontend_slot(addr))
    }

    /// Admits a backend; before its `DP_BACKENDS` entry is written.
    pub(crate) fn prefilter_backend(&mut self, addr: SocketAddr, protocol: u8) -> Result<()> {
        self.prefilter_set(backend_slot(&addr16(addr.ip()), addr.port(), protocol))
    }

    /// Sets the bits of everything already in the maps: service addresses
    /// (their wildcard entries), backends, and both sides of every
    /// conntrack entry (a flow may outlive its service and backend). Call
    /// once this datapath's programs are on the links (after
    /// `finish_migration`), then `enable_prefilter`. Entries written later
    /// by older programs still attached elsewhere are covered as long as
    /// they are keyed on frontends and backends of the shared maps, which
    /// every writer announces first.
    pub fn fill_prefilter(&mut self) -> Result<Filled> {
        // Any entry that cannot be read fails the fill (and the filter
        // stays off): a bit missed here would never be set later, since
        // the writers skip what the adopted maps already hold.
        let mut filled = Filled::default();
        let read_err = |name: &'static str| move |source| Error::Map { name, source };
        let services: HashMap<&MapData, ServiceKey, ServiceValue> =
            self.map_ref(map_names::SERVICES)?;
        let mut addresses = Vec::new();
        for key in services.keys() {
            let key = key.map_err(read_err(map_names::SERVICES))?;
            if key == ServiceKey::wildcard(key.addr) {
                addresses.push(key.addr);
            }
        }
        let backend_map: HashMap<&MapData, u32, Backend> = self.map_ref(map_names::BACKENDS)?;
        let mut backends = Vec::new();
        for entry in backend_map.iter() {
            backends.push(entry.map_err(read_err(map_names::BACKENDS))?.1);
        }
        let ct = self.ct_entries()?;
        for addr in &addresses {
            self.prefilter_set(frontend_slot(addr))?;
        }
        for b in &backends {
            self.prefilter_set(backend_slot(&b.addr, b.port, b.protocol))?;
        }
        for (key, entry) in &ct {
            let slot = if entry.direction == common::ct::CT_DIR_REPLY {
                backend_slot(&key.saddr, key.sport, key.protocol)
            } else {
                frontend_slot(&key.daddr)
            };
            self.prefilter_set(slot)?;
        }
        filled.frontend_addresses = addresses.len();
        filled.backends = backends.len();
        filled.conntrack_entries = ct.len();
        Ok(filled)
    }

    /// Turns the filter on: from now on a packet whose bits are not set
    /// skips the lookups. Everything written since goes through the
    /// bit-setting writers (`kernel::maps`).
    pub fn enable_prefilter(&mut self) -> Result<()> {
        let mut map: Array<&mut MapData, u64> = self.map_mut(map_names::PREFILTER)?;
        map.set(ENABLED_WORD, 1, 0).map_err(|source| Error::Map {
            name: map_names::PREFILTER,
            source,
        })
    }
}
