//! A minimal pcapng writer for `dp trace -w`: one section, one Ethernet
//! interface block per traced interface, one enhanced packet block per
//! traced packet with its verdict and reason as the packet comment
//! (`opt_comment`), which Wireshark shows as `frame.comment`.
//!
//! Format: IETF draft-ietf-opsawg-pcapng (section header 0x0A0D0D0A,
//! interface description 1, enhanced packet 6; little-endian here).

use std::{collections::BTreeMap, io::Write};

const SECTION_HEADER: u32 = 0x0A0D_0D0A;
const INTERFACE_DESCRIPTION: u32 = 1;
const ENHANCED_PACKET: u32 = 6;
const BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;
const LINKTYPE_ETHERNET: u16 = 1;
const OPT_END: u16 = 0;
const OPT_COMMENT: u16 = 1;
const SHB_USERAPPL: u16 = 4;
const IF_NAME: u16 = 2;
const IF_TSRESOL: u16 = 9;

pub struct PcapngWriter<W: Write> {
    out: W,
    /// ifindex -> interface id in this section.
    interfaces: BTreeMap<u32, u32>,
    snaplen: u32,
}

/// One option: code, length, value padded to 4 bytes.
fn option(buf: &mut Vec<u8>, code: u16, value: &[u8]) {
    buf.extend_from_slice(&code.to_le_bytes());
    buf.extend_from_slice(&(value.len() as u16).to_le_bytes());
    buf.extend_from_slice(value);
    pad4(buf);
}

fn pad4(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

impl<W: Write> PcapngWriter<W> {
    /// Writes the section header. `snaplen`: the most bytes of a packet kept.
    pub fn new(mut out: W, snaplen: u32) -> std::io::Result<Self> {
        let mut body = Vec::new();
        body.extend_from_slice(&BYTE_ORDER_MAGIC.to_le_bytes());
        body.extend_from_slice(&1u16.to_le_bytes()); // major
        body.extend_from_slice(&0u16.to_le_bytes()); // minor
        body.extend_from_slice(&(-1i64).to_le_bytes()); // section length unknown
        option(&mut body, SHB_USERAPPL, b"dp trace");
        option(&mut body, OPT_END, &[]);
        write_block(&mut out, SECTION_HEADER, &body)?;
        Ok(PcapngWriter {
            out,
            interfaces: BTreeMap::new(),
            snaplen,
        })
    }

    fn interface(&mut self, ifindex: u32, name: &str) -> std::io::Result<u32> {
        if let Some(id) = self.interfaces.get(&ifindex) {
            return Ok(*id);
        }
        let id = self.interfaces.len() as u32;
        let mut body = Vec::new();
        body.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&self.snaplen.to_le_bytes());
        option(&mut body, IF_NAME, name.as_bytes());
        // Timestamps in nanoseconds (10^-9).
        option(&mut body, IF_TSRESOL, &[9]);
        option(&mut body, OPT_END, &[]);
        write_block(&mut self.out, INTERFACE_DESCRIPTION, &body)?;
        self.interfaces.insert(ifindex, id);
        Ok(id)
    }

    /// One packet: `data` (the captured bytes of a frame of `original_len`
    /// bytes) seen on `ifindex` at `unix_ns`, with `comment`.
    pub fn packet(
        &mut self,
        ifindex: u32,
        ifname: &str,
        unix_ns: u64,
        data: &[u8],
        original_len: u32,
        comment: &str,
    ) -> std::io::Result<()> {
        let id = self.interface(ifindex, ifname)?;
        let mut body = Vec::new();
        body.extend_from_slice(&id.to_le_bytes());
        body.extend_from_slice(&((unix_ns >> 32) as u32).to_le_bytes());
        body.extend_from_slice(&(unix_ns as u32).to_le_bytes());
        body.extend_from_slice(&(data.len() as u32).to_le_bytes());
        body.extend_from_slice(&original_len.max(data.len() as u32).to_le_bytes());
        body.extend_from_slice(data);
        pad4(&mut body);
        option(&mut body, OPT_COMMENT, comment.as_bytes());
        option(&mut body, OPT_END, &[]);
        write_block(&mut self.out, ENHANCED_PACKET, &body)
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Type, total length, body, total length again.
fn write_block<W: Write>(out: &mut W, block_type: u32, body: &[u8]) -> std::io::Result<()> {
    let total = (12 + body.len()) as u32;
    out.write_all(&block_type.to_le_bytes())?;
    out.write_all(&total.to_le_bytes())?;
    out.write_all(body)?;
    out.write_all(&total.to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_whole_words_and_carry_their_length_twice() {
        let mut w = PcapngWriter::new(Vec::new(), 128).unwrap();
        w.packet(
            3,
            "eth0",
            1_700_000_000_123_456_789,
            &[1, 2, 3, 4, 5],
            60,
            "dropped: x",
        )
        .unwrap();
        let bytes = w.out;
        let mut off = 0;
        let mut types = Vec::new();
        while off < bytes.len() {
            let t = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap());
            let len = u32::from_le_bytes(bytes[off + 4..off + 8].try_into().unwrap()) as usize;
            assert_eq!(len % 4, 0);
            let trailer = u32::from_le_bytes(bytes[off + len - 4..off + len].try_into().unwrap());
            assert_eq!(trailer as usize, len);
            types.push(t);
            off += len;
        }
        assert_eq!(off, bytes.len());
        assert_eq!(
            types,
            [SECTION_HEADER, INTERFACE_DESCRIPTION, ENHANCED_PACKET]
        );
    }
}
