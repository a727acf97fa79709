//! A two-instruction XDP program that passes every frame, attached with a
//! BPF link. A veth peer needs an XDP program of its own before frames sent
//! to it with XDP_TX or XDP_REDIRECT are received promptly (its NAPI
//! receive queue exists only then): the node-network ports of the test
//! cluster get this one, as a physical NIC would need nothing.

use std::{
    ffi::CString,
    os::fd::{FromRawFd, OwnedFd},
};

use crate::{Error, Netns, Result};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a zero-padded bpf_attr of the declared size.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new file descriptor the kernel just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches the pass-everything program to `ifname` in `ns`. The returned
/// link keeps it attached; deleting the interface (or its namespace) ends it.
pub fn attach_xdp_pass(ns: &Netns, ifname: &str) -> Result<OwnedFd> {
    attach_xdp_return(ns, ifname, XDP_PASS, b"xdp_pass")
}

/// Attaches a program that drops every frame, as early as the kernel can:
/// the benchmarks' measure of what delivering a frame to a device costs.
pub fn attach_xdp_drop(ns: &Netns, ifname: &str) -> Result<OwnedFd> {
    attach_xdp_return(ns, ifname, XDP_DROP, b"xdp_drop")
}

/// `r0 = verdict; exit` on `ifname` in `ns`, named `name`.
fn attach_xdp_return(ns: &Netns, ifname: &str, verdict: i32, name: &[u8; 8]) -> Result<OwnedFd> {
    let ifname = ifname.to_string();
    let name = *name;
    ns.run(move || -> Result<OwnedFd> {
        let err = |what: &str| {
            let what = format!("{what} {ifname}");
            move |source| Error::Io {
                context: what,
                source,
            }
        };
        // r0 = verdict; exit.
        let mut insns = [0u8; 16];
        insns[0] = 0xb7;
        insns[4..8].copy_from_slice(&verdict.to_ne_bytes());
        insns[8] = 0x95;
        let license = CString::new("GPL").unwrap();
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
        attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[48..56].copy_from_slice(&name);
        let prog = bpf(BPF_PROG_LOAD, &mut attr).map_err(err("load the XDP program for"))?;

        let name = CString::new(ifname.clone()).unwrap();
        // SAFETY: a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(err("find")(std::io::Error::last_os_error()));
        }
        let mut attr = [0u8; 128];
        use std::os::fd::AsRawFd;
        attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        attr[8..12].copy_from_slice(&BPF_XDP.to_ne_bytes());
        bpf(BPF_LINK_CREATE, &mut attr).map_err(err("attach the XDP program to"))
    })?
}

/// Pins a link at `path` (in a bpffs), so it stays attached after its file
/// descriptor closes; removing the pin (or the interface) ends it.
pub fn pin(link: &OwnedFd, path: &std::path::Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| Error::Io {
        context: format!("pin path {}", path.display()),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })?;
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: `attr` is a zero-padded bpf_attr; `c_path` outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        return Err(Error::Io {
            context: format!("pin the XDP pass link at {}", path.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
