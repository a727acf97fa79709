//! CRC32c (Castagnoli), SCTP's checksum (RFC 9260 appendix A), and how it
//! changes when a packet's ports are rewritten, without reading the rest
//! of the packet.
//!
//! SCTP's checksum covers the SCTP packet only (no IP pseudo-header), so
//! rewriting addresses leaves it valid; rewriting ports does not. A CRC is
//! affine over GF(2): for two messages of the same length, `crc(A) ^
//! crc(B)` is `crc0(A ^ B)`, the CRC with initial value 0 and no final
//! inversion. When only the first four bytes (source and destination port)
//! change, `A ^ B` is those four bytes of difference followed by `len - 4`
//! zero bytes, and its `crc0` is the CRC of the four bytes "shifted" by
//! `len - 4` zero bytes: a multiplication by `x^(8 (len - 4))` modulo the
//! polynomial, done in a handful of bounded loops (as zlib's
//! `crc32_combine`). The datapath needs neither the chunk data nor a loop
//! over it, whatever the packet's length.

/// The Castagnoli polynomial, bit-reversed (bit 31 is `x^0`).
pub const POLY: u32 = 0x82F6_3B78;

/// All ones if bit 0 of `x` is set, else zero: a select without a branch.
/// (Branches in these loops made the verifier walk every path of every
/// iteration: the program went over its limit.)
#[inline(always)]
const fn mask(x: u32) -> u32 {
    0u32.wrapping_sub(x & 1)
}

/// `a * b` modulo the polynomial, both in the reflected form.
#[inline(always)]
pub const fn multmodp(a: u32, mut b: u32) -> u32 {
    let mut p = 0;
    let mut i = 0;
    while i < 32 {
        p ^= b & mask(a >> (31 - i));
        b = (b >> 1) ^ (POLY & mask(b));
        i += 1;
    }
    p
}

/// `x^(2^k)` modulo the polynomial, k = 0..32.
pub const X2N: [u32; 32] = {
    let mut t = [0u32; 32];
    t[0] = 1 << 30; // x^1
    let mut k = 1;
    while k < 32 {
        t[k] = multmodp(t[k - 1], t[k - 1]);
        k += 1;
    }
    t
};

/// `x^(8 i)` modulo the polynomial: `i` zero bytes, i = 0..256.
pub static SHIFT_LO: [u32; 256] = powers(X2N[3]);
/// `x^(8 * 256 i)`: `256 i` zero bytes, i = 0..256.
pub static SHIFT_HI: [u32; 256] = powers(X2N[11]);

/// `step^i` for i = 0..256.
const fn powers(step: u32) -> [u32; 256] {
    let mut t = [0u32; 256];
    t[0] = 1 << 31; // x^0
    let mut i = 1;
    while i < 256 {
        t[i] = multmodp(t[i - 1], step);
        i += 1;
    }
    t
}

/// The byte table of the reflected CRC (`crc0` of each byte value).
pub static BYTE_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = (crc >> 1) ^ (POLY & mask(crc));
            bit += 1;
        }
        t[i] = crc;
        i += 1;
    }
    t
};

/// The CRC register (`crc0`) of `r` followed by `n` zero bytes (n < 2^16):
/// `r * x^(8n)`, with `x^(8n)` from two tables (no loop over `n`'s bits,
/// which cost the verifier too much at every call site).
#[inline(always)]
pub fn shift_bytes(r: u32, n: u32) -> u32 {
    let p = multmodp(
        SHIFT_LO[(n & 0xff) as usize],
        SHIFT_HI[((n >> 8) & 0xff) as usize],
    );
    multmodp(p, r)
}

/// `crc0` (initial value 0, no final inversion) of four bytes.
#[inline(always)]
pub fn crc0_4(bytes: [u8; 4]) -> u32 {
    let mut crc = 0u32;
    let mut i = 0;
    while i < 4 {
        crc = (crc >> 8) ^ BYTE_TABLE[((crc ^ bytes[i] as u32) & 0xff) as usize];
        i += 1;
    }
    crc
}

/// What to XOR into an SCTP packet's checksum field (its four bytes as
/// stored: little-endian, as Linux writes it) when its ports change from
/// `(old_sport, old_dport)` to `(new_sport, new_dport)`; `sctp_len`: the
/// length of the SCTP packet (common header and chunks).
#[inline(always)]
pub fn port_change(old: (u16, u16), new: (u16, u16), sctp_len: u32) -> [u8; 4] {
    let s = (old.0 ^ new.0).to_be_bytes();
    let d = (old.1 ^ new.1).to_be_bytes();
    let r = crc0_4([s[0], s[1], d[0], d[1]]);
    shift_bytes(r, sctp_len.saturating_sub(4)).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC32c the textbook way (bit by bit over the whole message,
    /// initial value and final inversion all ones).
    fn crc32c(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ POLY
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// An SCTP packet of `len` bytes with its checksum field filled.
    fn packet(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        let mut p: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        p[8..12].fill(0);
        let c = crc32c(&p);
        p[8..12].copy_from_slice(&c.to_le_bytes());
        p
    }

    #[test]
    fn the_check_value_is_castagnolis() {
        // RFC 3720 / the CRC catalogue's check value for "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn a_port_change_updates_the_checksum_as_a_full_recomputation_would() {
        for (i, len) in [12usize, 16, 28, 100, 1452, 1500, 9000, 65_507]
            .into_iter()
            .enumerate()
        {
            let mut p = packet(len, i as u32 + 1);
            let old = (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            );
            let new: (u16, u16) = (old.0 ^ 0x5a5a, 8080);
            p[0..2].copy_from_slice(&new.0.to_be_bytes());
            p[2..4].copy_from_slice(&new.1.to_be_bytes());
            let delta = port_change(old, new, len as u32);
            for (b, d) in p[8..12].iter_mut().zip(delta) {
                *b ^= d;
            }
            let stored = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
            p[8..12].fill(0);
            assert_eq!(stored, crc32c(&p), "length {len}");
        }
    }

    #[test]
    fn unchanged_ports_change_nothing() {
        assert_eq!(port_change((1, 2), (1, 2), 1500), [0; 4]);
    }
}
