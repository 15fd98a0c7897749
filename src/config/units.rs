//! Byte sizes written as text: `"512MiB"`, `"2GB"`, `"1.5 GiB"`, `"4096"`.

/// Units accepted after the number, case-insensitively: decimal (`KB` = 1000) and binary
/// (`KiB` = 1024) multiples up to tera.
const UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("b", 1),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
];

/// What the error message shows as the accepted forms.
pub const BYTE_SIZE_FORMS: &str =
    "a byte size (an integer, or a number followed by B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)";

/// Parses a byte size; `None` if the text is not one (or is negative or overflows `u64`).
pub fn parse_byte_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let (_, scale) = UNITS.iter().find(|(name, _)| *name == unit)?;
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(*scale);
    }
    let value: f64 = number.parse().ok()?;
    let bytes = (value * *scale as f64).round();
    (bytes.is_finite() && bytes < u64::MAX as f64).then_some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_units() {
        assert_eq!(parse_byte_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_byte_size("2GB"), Some(2_000_000_000));
        assert_eq!(parse_byte_size("1.5 GiB"), Some(3 << 29));
        assert_eq!(parse_byte_size("4096"), Some(4096));
        assert_eq!(parse_byte_size("16kib"), Some(16 * 1024));
        assert_eq!(parse_byte_size(" 7 B "), Some(7));
    }

    #[test]
    fn rejects_garbage_negative_and_overflow() {
        for bad in ["", "MiB", "12XB", "-5MiB", "1.2.3GB", "99999999999TiB", "five"] {
            assert_eq!(parse_byte_size(bad), None, "{bad:?}");
        }
    }
}
