//! Numbers on the command line, parsed like QEMU's `qemu_strtosz` and `qemu_strtou64`, with
//! qemu-img's `cvtnum` error texts.

use crate::cli::Fail;

/// Why a number did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumError {
    /// Not a number at all (QEMU: `-EINVAL`).
    Invalid,
    /// A number, but out of range (QEMU: `-ERANGE`).
    Range,
}

/// `qemu_strtosz`: a size with an optional binary suffix (b, k, M, G, T, P, E; any case),
/// decimal with an optional fraction (only with a suffix other than `b`), or hex without
/// fraction or suffix.
pub fn parse_size(s: &str) -> Result<u64, NumError> {
    let t = s.trim_start();
    if t.starts_with('-') {
        // QEMU reports negative sizes as out of range.
        return Err(NumError::Range);
    }
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(NumError::Invalid);
        }
        return u64::from_str_radix(hex, 16).map_err(|_| NumError::Range);
    }
    let int_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (int_part, rest) = t.split_at(int_end);
    let (frac_part, rest) = match rest.strip_prefix('.') {
        Some(r) => {
            let end = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            (Some(&r[..end]), &r[end..])
        }
        None => (None, rest),
    };
    if int_part.is_empty() && frac_part.is_none_or(|f| f.is_empty()) {
        return Err(NumError::Invalid);
    }
    let mut chars = rest.chars();
    let mul: u64 = match chars.next() {
        None => 1,
        Some(c) => match c.to_ascii_uppercase() {
            'B' => 1,
            'K' => 1 << 10,
            'M' => 1 << 20,
            'G' => 1 << 30,
            'T' => 1 << 40,
            'P' => 1 << 50,
            'E' => 1 << 60,
            _ => return Err(NumError::Invalid),
        },
    };
    if chars.next().is_some() {
        return Err(NumError::Invalid);
    }
    // A fraction needs a multiplier: "1.5" and "1.5b" are rejected, as QEMU does.
    if frac_part.is_some() && mul == 1 {
        return Err(NumError::Invalid);
    }
    let int: u64 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| NumError::Range)?
    };
    let frac: f64 = match frac_part {
        Some(f) if !f.is_empty() => format!("0.{f}").parse().unwrap_or(0.0),
        _ => 0.0,
    };
    let whole = int.checked_mul(mul).ok_or(NumError::Range)?;
    let extra = (frac * mul as f64).floor() as u64;
    whole.checked_add(extra).ok_or(NumError::Range)
}

/// `qemu_strtou64` with base 0: decimal, `0x` hex or `0` octal.
pub fn parse_u64(s: &str) -> Result<u64, NumError> {
    let t = s.trim_start();
    if let Some(neg) = t.strip_prefix('-') {
        // strtoull accepts a sign and wraps; QEMU then reports the range.
        return match parse_u64(neg) {
            Ok(0) => Ok(0),
            Ok(_) => Err(NumError::Range),
            Err(e) => Err(e),
        };
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let (digits, radix) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (h, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        (&t[1..], 8)
    } else {
        (t, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(NumError::Invalid);
    }
    u64::from_str_radix(digits, radix).map_err(|_| NumError::Range)
}

/// qemu-img's `cvtnum_full`: parse `value` as a size or a plain number within `[min, max]`.
pub fn cvtnum_full(
    name: &str,
    value: &str,
    is_size: bool,
    min: i64,
    max: i64,
) -> Result<i64, Fail> {
    let r = if is_size {
        parse_size(value)
    } else {
        parse_u64(value)
    };
    match r {
        Err(NumError::Invalid) => Err(Fail::msg(format!("Invalid {name} specified: '{value}'."))),
        Ok(v) if v <= max as u64 && v as i64 >= min => Ok(v as i64),
        _ => Err(Fail::msg(format!(
            "Invalid {name} specified. Must be between {min} and {max}."
        ))),
    }
}

/// qemu-img's `cvtnum`: a value in `[0, i64::MAX]`.
pub fn cvtnum(name: &str, value: &str, is_size: bool) -> Result<i64, Fail> {
    cvtnum_full(name, value, is_size, 0, i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_qemu_parses_them() {
        // Cases checked against `qemu-img create -f raw y.raw SIZE` (10.0.2).
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("1.5M"), Ok(1572864));
        assert_eq!(parse_size("1.1k"), Ok(1126));
        assert_eq!(parse_size(".5k"), Ok(512));
        assert_eq!(parse_size("0x10"), Ok(16));
        assert_eq!(parse_size(" 5"), Ok(5));
        assert_eq!(parse_size("1024b"), Ok(1024));
        assert_eq!(parse_size("1.0000000001k"), Ok(1024));
        assert_eq!(parse_size("1e"), Ok(1 << 60));
        assert_eq!(parse_size("16E"), Err(NumError::Range));
        assert_eq!(parse_size("-1"), Err(NumError::Range));
        for bad in [
            "1.5", "1.5b", "1kB", "0x10k", "0x1.8k", "5x", "0.5", "1e6", "1Q", "",
        ] {
            assert_eq!(parse_size(bad), Err(NumError::Invalid), "{bad}");
        }
    }

    #[test]
    fn cvtnum_messages() {
        assert_eq!(
            cvtnum("image size", "1Q", true).unwrap_err().message(),
            Some("Invalid image size specified: '1Q'.")
        );
        assert_eq!(
            cvtnum("image size", "8E", true).unwrap_err().message(),
            Some("Invalid image size specified. Must be between 0 and 9223372036854775807.")
        );
        assert_eq!(parse_u64("0x10"), Ok(16));
        assert_eq!(parse_u64("010"), Ok(8));
        assert!(cvtnum_full("queue depth", "0", false, 1, i32::MAX as i64).is_err());
    }
}
