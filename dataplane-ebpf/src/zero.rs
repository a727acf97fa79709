//! Zeroing and address stores without `memset`.
//!
//! LLVM turns a run of zero stores (a struct literal's zero fields,
//! `mem::zeroed`, a `Default`) into a call to `memset`, and the `memset`
//! linked into BPF programs (compiler_builtins) stores one byte per loop
//! iteration. Found with `perf` on the connection-rate benchmark: the
//! per-packet record reset alone was a 98-iteration loop, and `memset` took
//! as many samples as the ingress program itself. Volatile word stores are
//! left as they are by LLVM, so these cost one instruction per word.

use core::{mem::MaybeUninit, ptr::write_volatile};

/// Zeroes the first `N` 64-bit words at `p`.
///
/// # Safety
/// `p` is valid for writes of `N` words and 8-byte aligned.
#[inline(always)]
pub unsafe fn words64<const N: usize>(p: *mut u64) {
    let mut i = 0;
    while i < N {
        // SAFETY: within the caller's bounds.
        unsafe { write_volatile(p.add(i), 0) };
        i += 1;
    }
}

/// Zeroes `slot` in place with 32-bit stores and returns it initialised
/// (`T`'s size a multiple of 4, its alignment at least 4: checked at compile
/// time). In place, because a zeroed value returned by value is copied, and
/// LLVM turns the copy of its known-zero bytes back into a `memset`.
#[inline(always)]
pub fn fill32<T: Copy>(slot: &mut MaybeUninit<T>) -> &mut T {
    const { assert!(size_of::<T>() % 4 == 0 && align_of::<T>() >= 4) };
    let p = slot.as_mut_ptr().cast::<u32>();
    let mut i = 0;
    while i < size_of::<T>() / 4 {
        // SAFETY: within `slot`, 4-byte aligned (asserted above).
        unsafe { write_volatile(p.add(i), 0) };
        i += 1;
    }
    // SAFETY: every byte written; callers use plain-old-data types, for
    // which all zero bytes are a valid value.
    unsafe { slot.assume_init_mut() }
}

/// Stores IPv4 address `a` in `dst` as `::ffff:a.b.c.d` (see
/// `common::addr::v4_mapped`), the zero prefix as one 64-bit and one 16-bit
/// store. `dst` must be 8-byte aligned (the tuples in map values are).
#[inline(always)]
pub fn set_v4_mapped(dst: &mut [u8; 16], a: [u8; 4]) {
    let p = dst.as_mut_ptr();
    // SAFETY: within the 16 bytes of `dst`; the 64-bit store is aligned
    // because `dst` is, the 16-bit one at offset 8 then is too.
    unsafe {
        write_volatile(p.cast::<u64>(), 0);
        write_volatile(p.add(8).cast::<u16>(), 0);
    }
    dst[10] = 0xff;
    dst[11] = 0xff;
    dst[12..16].copy_from_slice(&a);
}
