//! The pass-through filter (`common::prefilter`), from the agent's side:
//! a frontend's bit is set before its wildcard entry is written; at start
//! the marks of what the adopted maps and conntrack hold, then the filter
//! is turned on. (The datapath marks the backends of the flows it tracks.)

use aya::maps::{Array, HashMap, MapData};
use common::{
    ct::CT_DIR_REPLY,
    map_names,
    prefilter::{backend_address_word, backend_word, frontend_slot, ENABLED_WORD, FRONTEND_BASE},
    ServiceKey, ServiceValue,
};

use super::loader::Datapath;
use crate::error::{Error, Result};

/// What a fill marked, for the agent's log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filled {
    pub frontend_addresses: usize,
    pub conntrack_entries: usize,
}

fn map_err(source: aya::maps::MapError) -> Error {
    Error::Map {
        name: map_names::PREFILTER,
        source,
    }
}

impl Datapath {
    /// Sets the frontend bit `bit` of word `word`, unless it already has
    /// it (`self.prefilter` mirrors the frontend words, which only
    /// userspace writes: a bit already set costs no syscall).
    fn prefilter_frontend_bit(&mut self, (word, bit): (u32, u64)) -> Result<()> {
        let Some(w) = self
            .prefilter
            .get_mut(word.wrapping_sub(FRONTEND_BASE) as usize)
        else {
            return Ok(());
        };
        if *w & bit != 0 {
            return Ok(());
        }
        let value = *w | bit;
        let mut map: Array<&mut MapData, u64> = self.map_mut(map_names::PREFILTER)?;
        map.set(word, value, 0).map_err(map_err)?;
        self.prefilter[(word - FRONTEND_BASE) as usize] = value;
        Ok(())
    }

    /// Admits a service address; before its wildcard entry is written.
    pub(crate) fn prefilter_frontend(&mut self, addr: &[u8; 16]) -> Result<()> {
        self.prefilter_frontend_bit(frontend_slot(addr))
    }

    /// Sets the marks of everything already in the maps: service addresses
    /// (their wildcard entries), and of every conntrack entry its frontend
    /// (original direction) or its backend (reply direction): a flow may
    /// outlive its service and backend, and older programs did not mark.
    /// Call once this datapath's programs are on the links (after
    /// `finish_migration`), then `enable_prefilter`. Programs of an older
    /// agent still attached to a device this datapath is not on mark
    /// nothing here: the replies of flows they track after this fill are
    /// not translated where this datapath's programs meet them (a known
    /// limit: `dp cleanup` removes such links, ARCHITECTURE.md).
    pub fn fill_prefilter(&mut self) -> Result<Filled> {
        // Any entry that cannot be read fails the fill (and the filter
        // stays off): a frontend missed here would never be marked later,
        // since the writers skip what the adopted maps already hold.
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
        let ct = self.ct_entries()?;
        for addr in &addresses {
            self.prefilter_frontend_bit(frontend_slot(addr))?;
        }
        // Each backend word once (a node's conntrack holds many flows per
        // backend): one syscall per word, not per entry.
        let mut backend_words = std::collections::BTreeSet::new();
        for (key, entry) in &ct {
            if entry.direction == CT_DIR_REPLY {
                backend_words.insert(backend_address_word(&key.saddr));
                backend_words.insert(backend_word(&key.saddr, key.sport, key.protocol));
            } else {
                self.prefilter_frontend_bit(frontend_slot(&key.daddr))?;
            }
        }
        let mut map: Array<&mut MapData, u64> = self.map_mut(map_names::PREFILTER)?;
        for word in backend_words {
            map.set(word, 1, 0).map_err(map_err)?;
        }
        Ok(Filled {
            frontend_addresses: addresses.len(),
            conntrack_entries: ct.len(),
        })
    }

    /// Turns the filter on: from now on a packet without marks skips the
    /// lookups.
    pub fn enable_prefilter(&mut self) -> Result<()> {
        let mut map: Array<&mut MapData, u64> = self.map_mut(map_names::PREFILTER)?;
        map.set(ENABLED_WORD, 1, 0).map_err(map_err)
    }
}
