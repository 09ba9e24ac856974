//! Checked arithmetic on byte ranges: every offset that comes from an untrusted header or
//! request goes through here, so overflow is an error, never a wrap.

use crate::{Error, Result};

/// `offset + len`, or an error naming `what` on overflow.
pub fn end_of(offset: u64, len: u64, what: &str) -> Result<u64> {
    offset
        .checked_add(len)
        .ok_or_else(|| Error::invalid(format!("{what}: offset {offset} + length {len} overflows")))
}

/// Check that `[offset, offset + len)` lies within `[0, size)`.
pub fn check_request(offset: u64, len: u64, size: u64) -> Result<()> {
    let end = end_of(offset, len, "request")?;
    if end > size {
        return Err(Error::invalid(format!(
            "request [{offset}, {end}) is past the end of the {size}-byte node"
        )));
    }
    Ok(())
}

/// Round `x` down to a multiple of the power of two `align`.
pub fn align_down(x: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    x & !(align - 1)
}

/// Round `x` up to a multiple of the power of two `align` (saturating at the top).
pub fn align_up(x: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    x.checked_add(align - 1)
        .map_or(align_down(u64::MAX, align), |v| align_down(v, align))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_past_the_end_or_overflowing_fail() {
        assert!(check_request(0, 512, 512).is_ok());
        assert!(check_request(1, 512, 512).is_err());
        assert!(check_request(u64::MAX, 2, u64::MAX).is_err());
    }

    #[test]
    fn alignment() {
        assert_eq!(align_down(4097, 4096), 4096);
        assert_eq!(align_up(4097, 4096), 8192);
        assert_eq!(align_up(u64::MAX, 4096), u64::MAX - 4095);
    }
}
