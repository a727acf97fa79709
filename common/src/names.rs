//! Names of services and backends, for the inspection commands and traces:
//! `DP_NAMES`, written by the agent, never read by the programs. Pinned, so
//! `dp service list` and friends can name things while the agent is down.

use bytemuck::{Pod, Zeroable};

/// `NameKey::kind`: a service id (`ServiceValue::service_id`).
pub const NAME_KIND_SERVICE: u32 = 1;
/// `NameKey::kind`: a backend id (`DP_BACKENDS` key).
pub const NAME_KIND_BACKEND: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct NameKey {
    pub kind: u32,
    pub id: u32,
}

/// Bytes a name keeps; longer names are cut.
pub const NAME_BYTES: usize = 128;

/// A UTF-8 name, `len` bytes of `bytes`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct NameValue {
    pub len: u32,
    pub bytes: [u8; NAME_BYTES],
}

impl NameValue {
    pub fn new(name: &str) -> Self {
        let mut v = NameValue {
            len: 0,
            bytes: [0; NAME_BYTES],
        };
        let mut n = name.len().min(NAME_BYTES);
        while !name.is_char_boundary(n) {
            n -= 1;
        }
        v.bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
        v.len = n as u32;
        v
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..(self.len as usize).min(NAME_BYTES)]
    }
}
