//! One's-complement checksums over small buffers (ICMP, rebuilt headers).

/// One's-complement sum of the 16-bit words of `buf[off..off + len]`.
#[inline(always)]
pub fn sum_words(buf: &[u8], off: usize, len: usize, mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < len && off + i + 1 < buf.len() {
        sum += u32::from(u16::from_be_bytes([buf[off + i], buf[off + i + 1]]));
        i += 2;
    }
    sum
}

/// Folds a sum and complements it: the checksum field's value.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Incremental update of checksum `csum` for a 16-bit word changing from
/// `old` to `new` (RFC 1624: HC' = ~(~HC + ~m + m')).
#[inline(always)]
pub fn replace16(csum: u16, old: u16, new: u16) -> u16 {
    let sum = u32::from(!csum) + u32::from(!old) + u32::from(new);
    fold(sum)
}
