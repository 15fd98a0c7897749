//! sha256 digests as lowercase hex.

use std::fmt;
use std::io::Read;
use std::path::Path;

use sha2::{Digest as _, Sha256};

use super::error::RegistryError;

/// A sha256 digest: 64 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Digest(String);

impl Digest {
    /// Parses 64 hex digits (either case).
    pub fn parse(text: &str) -> Result<Digest, RegistryError> {
        let t = text.trim();
        if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Digest(t.to_ascii_lowercase()))
        } else {
            Err(RegistryError::BadDigest(text.to_owned()))
        }
    }

    /// The digest of a finished hasher.
    pub fn of(hasher: Sha256) -> Digest {
        Digest(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The sha256 of a file's contents, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> Result<Digest, RegistryError> {
    sha256_file_with(path, |_| {})
}

/// [`sha256_file`], calling `read` with the byte count of each piece as it is hashed (for a
/// progress bar).
pub fn sha256_file_with(path: &Path, mut read: impl FnMut(u64)) -> Result<Digest, RegistryError> {
    let mut file = std::fs::File::open(path).map_err(RegistryError::io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(RegistryError::io(path))?;
        if n == 0 {
            return Ok(Digest::of(hasher));
        }
        hasher.update(&buf[..n]);
        read(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_and_names_bad_input() {
        let d = Digest::parse(&"AB".repeat(32)).unwrap();
        assert_eq!(d.as_str(), "ab".repeat(32));
        assert!(matches!(Digest::parse("abc"), Err(RegistryError::BadDigest(s)) if s == "abc"));
        assert!(Digest::parse(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn digest_of_empty_input_is_the_known_value() {
        let d = Digest::of(Sha256::new());
        assert_eq!(d.as_str(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
