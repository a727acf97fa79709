//! A map's entries as bytes, through the `bpf(2)` element commands: for
//! code that reads maps of layouts it knows only by description (a
//! migration, `dp status`), where aya's typed maps need the types.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

/// The `BPF_MAP_*_ELEM` part of `union bpf_attr`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// `value`, or `next_key` for `BPF_MAP_GET_NEXT_KEY`.
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// `BPF_NOEXIST`: insert only.
pub const BPF_NOEXIST: u64 = 1;

/// One map, by fd, with its key and value sizes.
#[derive(Clone, Copy)]
pub struct RawMap<'a> {
    fd: BorrowedFd<'a>,
    pub key_size: usize,
    pub value_size: usize,
}

impl<'a> RawMap<'a> {
    pub fn new(fd: BorrowedFd<'a>, key_size: u32, value_size: u32) -> Self {
        RawMap {
            fd,
            key_size: key_size as usize,
            value_size: value_size as usize,
        }
    }

    fn call(&self, cmd: libc::c_long, key: u64, value: u64, flags: u64) -> io::Result<()> {
        let attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key,
            value,
            flags,
        };
        // SAFETY: attr points at buffers of the map's key and value sizes
        // (checked by the callers), live across the call; the kernel reads
        // size_of::<ElemAttr>() bytes of attr.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &attr as *const ElemAttr,
                size_of::<ElemAttr>(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The key after `key` (the first with `None`); `false` at the end.
    pub fn next_key(&self, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
        assert!(next.len() == self.key_size && key.is_none_or(|k| k.len() == self.key_size));
        match self.call(
            BPF_MAP_GET_NEXT_KEY,
            key.map_or(0, |k| k.as_ptr() as u64),
            next.as_mut_ptr() as u64,
            0,
        ) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The value of `key` into `value`; `false` if there is none.
    pub fn lookup(&self, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        assert!(key.len() == self.key_size && value.len() == self.value_size);
        match self.call(
            BPF_MAP_LOOKUP_ELEM,
            key.as_ptr() as u64,
            value.as_mut_ptr() as u64,
            0,
        ) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn update(&self, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
        assert!(key.len() == self.key_size && value.len() == self.value_size);
        self.call(
            BPF_MAP_UPDATE_ELEM,
            key.as_ptr() as u64,
            value.as_ptr() as u64,
            flags,
        )
    }

    pub fn delete(&self, key: &[u8]) -> io::Result<()> {
        assert!(key.len() == self.key_size);
        match self.call(BPF_MAP_DELETE_ELEM, key.as_ptr() as u64, 0, 0) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e),
            _ => Ok(()),
        }
    }

    /// Every entry, as (key, value) bytes. Entries deleted meanwhile are
    /// skipped; a walk restarted by a deleted key may see one twice.
    pub fn entries(&self) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut key: Option<Vec<u8>> = None;
        loop {
            let mut next = vec![0u8; self.key_size];
            if !self.next_key(key.as_deref(), &mut next)? {
                return Ok(out);
            }
            let mut value = vec![0u8; self.value_size];
            if self.lookup(&next, &mut value)? {
                out.push((next.clone(), value));
            }
            key = Some(next);
        }
    }
}
