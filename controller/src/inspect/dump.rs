//! A stable text dump of the programmed service maps, read back from the
//! kernel: what the datapath will do, in words. Used by the golden tests
//! and, later, the inspection commands.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr};

use aya::maps::{HashMap, MapData};
use common::{
    addr::ip_of,
    lb::{
        BACKEND_FLAG_RETIRED, BACKEND_FLAG_TERMINATING, SCOPE_INTERNAL, SERVICE_FLAG_AFFINITY,
        SERVICE_FLAG_EXTERNAL, SERVICE_FLAG_LOCAL_ONLY, SERVICE_FLAG_REJECT_UNSERVED,
        SERVICE_FLAG_SOURCE_RANGES, SERVICE_FLAG_WILDCARD,
    },
    map_names, Backend, RevNatValue, ServiceKey, ServiceValue,
};

use crate::{
    error::{Error, Result},
    kernel::Datapath,
    translate::protocol_name,
};

impl Datapath {
    /// Frontends with their slots, service addresses, backends, reverse NAT.
    /// `names`: service id -> name; `nodes`: backend id -> node.
    pub fn dump(
        &self,
        names: &BTreeMap<u32, String>,
        nodes: &BTreeMap<u32, String>,
    ) -> Result<String> {
        let services: HashMap<&MapData, ServiceKey, ServiceValue> =
            self.map_ref(map_names::SERVICES)?;
        let backends: HashMap<&MapData, u32, Backend> = self.map_ref(map_names::BACKENDS)?;
        let revnat: HashMap<&MapData, u32, RevNatValue> = self.map_ref(map_names::REVNAT)?;
        let map_err = |name: &'static str| move |source| Error::Map { name, source };

        let mut masters = BTreeMap::new();
        let mut slots = BTreeMap::new();
        let mut addresses = Vec::new();
        for item in services.iter() {
            let (k, v) = item.map_err(map_err(map_names::SERVICES))?;
            let frontend = (ip_of(&k.addr), k.port, k.protocol, k.scope);
            if v.flags & SERVICE_FLAG_WILDCARD != 0 {
                addresses.push((ip_of(&k.addr), v.flags & SERVICE_FLAG_REJECT_UNSERVED != 0));
            } else if k.slot == 0 {
                masters.insert(frontend, v);
            } else {
                slots.insert((frontend, k.slot), v.backend_id);
            }
        }
        let mut all_backends = BTreeMap::new();
        for item in backends.iter() {
            let (id, b) = item.map_err(map_err(map_names::BACKENDS))?;
            all_backends.insert(id, b);
        }
        let describe = |id: u32| match all_backends.get(&id) {
            Some(b) => {
                let mut s = SocketAddr::new(ip_of(&b.addr), b.port).to_string();
                if let Some(node) = nodes.get(&id) {
                    let _ = write!(s, " ({node})");
                }
                s
            }
            None => format!("#{id} MISSING"),
        };

        let mut out = String::new();
        let _ = writeln!(out, "frontends:");
        let ranges = self.read_source_ranges()?;
        for (&(ip, port, protocol, scope), m) in &masters {
            let slot_list = |from: u16, count: u16| -> String {
                let list: Vec<String> = (from..from + count)
                    .map(|s| {
                        slots
                            .get(&((ip, port, protocol, scope), s))
                            .map_or_else(|| format!("slot {s} MISSING"), |id| describe(*id))
                    })
                    .collect();
                if list.is_empty() {
                    "-".into()
                } else {
                    list.join(", ")
                }
            };
            if scope == SCOPE_INTERNAL {
                let _ = writeln!(
                    out,
                    "    from inside: ready {}; terminating {}",
                    slot_list(1, m.count),
                    slot_list(1 + m.count, m.terminating_count)
                );
                continue;
            }
            let name = names.get(&m.service_id).map_or("?", String::as_str);
            let mut flags = String::new();
            for (flag, word) in [
                (SERVICE_FLAG_EXTERNAL, " external"),
                (SERVICE_FLAG_LOCAL_ONLY, " local-only"),
            ] {
                if m.flags & flag != 0 {
                    flags.push_str(word);
                }
            }
            if m.flags & SERVICE_FLAG_AFFINITY != 0 {
                let _ = write!(flags, " affinity={}s", m.affinity_timeout_s);
            }
            if m.flags & SERVICE_FLAG_SOURCE_RANGES != 0 {
                let list: Vec<String> = ranges
                    .get(&m.service_id)
                    .into_iter()
                    .flatten()
                    .map(|(ip, len)| format!("{ip}/{len}"))
                    .collect();
                let _ = write!(flags, " source-ranges={}", list.join(","));
            }
            let _ = writeln!(
                out,
                "  {}/{} service {} {name}{flags}",
                SocketAddr::new(ip, port),
                protocol_name(protocol),
                m.service_id
            );
            let _ = writeln!(out, "    ready:       {}", slot_list(1, m.count));
            let _ = writeln!(
                out,
                "    terminating: {}",
                slot_list(1 + m.count, m.terminating_count)
            );
        }
        addresses.sort();
        let list: Vec<String> = addresses
            .iter()
            .map(|(ip, reject)| {
                if *reject {
                    format!("{ip} (other ports rejected)")
                } else {
                    ip.to_string()
                }
            })
            .collect();
        let _ = writeln!(out, "service addresses: {}", list.join(", "));
        let _ = writeln!(out, "backends:");
        for (id, b) in &all_backends {
            let flag = if b.flags & BACKEND_FLAG_RETIRED != 0 {
                " retired"
            } else if b.flags & BACKEND_FLAG_TERMINATING != 0 {
                " terminating"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  {id} {}/{}{flag}",
                SocketAddr::new(ip_of(&b.addr), b.port),
                protocol_name(b.protocol)
            );
        }
        let mut rev = BTreeMap::new();
        for item in revnat.iter() {
            let (id, v) = item.map_err(map_err(map_names::REVNAT))?;
            rev.insert(id, v);
        }
        let _ = writeln!(out, "reverse nat:");
        for (id, v) in rev {
            let _ = writeln!(out, "  {id} -> {}", SocketAddr::new(ip_of(&v.addr), v.port));
        }
        Ok(out)
    }
}
