//! The key format: `<prefix>_<random><checksum>`.
//!
//! - `prefix` is readable and names the environment (`kg_live`, `kg_test`, `kg_dev`, or a
//!   namespace's own), so a leaked key says where it works and secret scanners can match it;
//! - `random` is 27 base62 characters from the OS CSPRNG (160.8 bits);
//! - `checksum` is the CRC-32 of everything before it, as 6 base62 characters, so that a
//!   mistyped or invented key is refused before any hashing or lookup.
//!
//! Only the SHA-256 of the whole key is ever stored.
//!
//! Admin tokens that keygate makes (`keygate init`, `keygate tokens create`,
//! `POST /v1/admin-tokens`) have the same format with the prefix [`ADMIN_TOKEN_PREFIX`], so
//! that there is one token format for scanners and for the checksum's typo check.

use sha2::{Digest, Sha256};

/// Base62 characters of randomness in a key.
pub const RANDOM_LEN: usize = 27;
/// Base62 characters of checksum at the end of a key.
pub const CHECKSUM_LEN: usize = 6;
/// Longest prefix accepted, so a parse never scans an unbounded header.
pub const MAX_PREFIX_LEN: usize = 32;
/// Longest token the gateway will look at; anything longer is malformed.
pub const MAX_TOKEN_LEN: usize = MAX_PREFIX_LEN + 1 + RANDOM_LEN + CHECKSUM_LEN;

/// The prefix of every admin token keygate makes: `kga_…`.
pub const ADMIN_TOKEN_PREFIX: &str = "kga";

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A key that passed the format check: its prefix, and the whole token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    pub prefix: &'a str,
    pub token: &'a str,
}

/// Why a token is not a well-formed keygate key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("the key is longer than any keygate key")]
    TooLong,
    #[error("the key has no `<prefix>_` part")]
    NoPrefix,
    #[error("the key's prefix may hold only a-z, 0-9 and `_`")]
    BadPrefix,
    #[error("the key's secret part has the wrong length or characters")]
    BadBody,
    #[error("the key's checksum does not match: it was mistyped or made up")]
    BadChecksum,
}

/// Checks a token's shape and checksum without any lookup.
pub fn parse(token: &str) -> Result<ParsedKey<'_>, FormatError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(FormatError::TooLong);
    }
    let (prefix, body) = token.rsplit_once('_').ok_or(FormatError::NoPrefix)?;
    if !valid_prefix(prefix) {
        return Err(FormatError::BadPrefix);
    }
    if body.len() != RANDOM_LEN + CHECKSUM_LEN || !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(FormatError::BadBody);
    }
    // The body check above makes the token at least CHECKSUM_LEN long.
    let (signed, sum) = token
        .as_bytes()
        .split_last_chunk::<CHECKSUM_LEN>()
        .ok_or(FormatError::BadBody)?;
    if decode_checksum(sum) != Some(u64::from(crc32(signed))) {
        return Err(FormatError::BadChecksum);
    }
    Ok(ParsedKey { prefix, token })
}

/// Whether `prefix` may start a key: 1 to 32 of `a-z 0-9 _`, not starting or ending in `_`.
pub fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && !prefix.starts_with('_')
        && !prefix.ends_with('_')
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Makes a new key with `prefix` from the OS CSPRNG.
pub fn generate(prefix: &str) -> Result<String, getrandom::Error> {
    debug_assert!(valid_prefix(prefix));
    let mut key = String::with_capacity(prefix.len().saturating_add(1 + RANDOM_LEN + CHECKSUM_LEN));
    key.push_str(prefix);
    key.push('_');
    let mut random = [b'0'; RANDOM_LEN];
    let mut slots = random.iter_mut();
    let mut pool = [0u8; 64];
    while slots.len() > 0 {
        getrandom::fill(&mut pool)?;
        // Rejection sampling keeps every character uniform: 248 = 4 * 62. The pool comes
        // first in the zip so that running out of pool bytes never skips a slot.
        for (&b, slot) in pool.iter().filter(|&&b| b < 248).zip(slots.by_ref()) {
            *slot = base62_digit(b.into());
        }
    }
    key.extend(random.iter().copied().map(char::from));
    let sum = checksum(key.as_bytes());
    key.extend(sum.iter().copied().map(char::from));
    Ok(key)
}

/// Makes a new admin token (`kga_…`) from the OS CSPRNG.
pub fn generate_admin_token() -> Result<String, getrandom::Error> {
    generate(ADMIN_TOKEN_PREFIX)
}

/// SHA-256 of the whole key: the only form in which a key is stored or looked up.
pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The CRC-32 (IEEE) of `data` as 6 base62 characters.
fn checksum(data: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32(data);
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = base62_digit(n);
        n /= 62;
    }
    out
}

/// The base62 character for `n % 62`.
#[allow(clippy::indexing_slicing)] // n % 62 is below 62, BASE62's length.
fn base62_digit(n: u32) -> u8 {
    BASE62[(n % 62) as usize]
}

fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// The value of 6 base62 characters, or `None` if one is not base62. Decoding the presented
/// checksum and comparing numbers is cheaper than encoding ours.
fn decode_checksum(text: &[u8]) -> Option<u64> {
    text.iter().try_fold(0u64, |n, &c| {
        let digit = match c {
            b'0'..=b'9' => c.checked_sub(b'0'),
            b'A'..=b'Z' => c.checked_sub(b'A' - 10),
            b'a'..=b'z' => c.checked_sub(b'a' - 36),
            _ => None,
        }?;
        n.checked_mul(62)?.checked_add(u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn checksums_decode_to_what_they_encode() {
        for data in [&b""[..], b"kg_live_abc", b"123456789"] {
            assert_eq!(
                decode_checksum(&checksum(data)),
                Some(u64::from(crc32(data)))
            );
        }
        assert_eq!(decode_checksum(b"zzzzzz"), Some(62u64.pow(6) - 1));
        assert_eq!(decode_checksum(b"ab-def"), None);
    }

    #[test]
    fn generated_keys_parse_and_differ() {
        let a = generate("kg_live").unwrap();
        let b = generate("kg_live").unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), "kg_live_".len() + RANDOM_LEN + CHECKSUM_LEN);
        let parsed = parse(&a).unwrap();
        assert_eq!(parsed.prefix, "kg_live");
        assert_eq!(parsed.token, a);
    }

    #[test]
    fn any_single_character_change_is_caught() {
        let key = generate("kg_test").unwrap();
        let start = "kg_test_".len();
        for i in start..key.len() {
            let mut bytes = key.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let typo = String::from_utf8(bytes).unwrap();
            assert_eq!(
                parse(&typo),
                Err(FormatError::BadChecksum),
                "typo at {i} slipped through"
            );
        }
    }

    #[test]
    fn malformed_tokens_are_named() {
        assert_eq!(parse("nounderscore"), Err(FormatError::NoPrefix));
        assert_eq!(parse("KG_live_abc"), Err(FormatError::BadPrefix));
        assert_eq!(parse("kg_live_short"), Err(FormatError::BadBody));
        assert_eq!(parse(&"x".repeat(1_000_000)), Err(FormatError::TooLong));
        let key = generate("kg_dev").unwrap();
        // A symbol in the secret part, wherever it falls: the first character of the random
        // part, the middle, and the last of the checksum.
        let start = "kg_dev_".len();
        for i in [start, start + RANDOM_LEN / 2, key.len() - 1] {
            let mut with_symbol = key.clone().into_bytes();
            with_symbol[i] = b'-';
            let with_symbol = String::from_utf8(with_symbol).unwrap();
            assert_ne!(with_symbol, key);
            assert_eq!(
                parse(&with_symbol),
                Err(FormatError::BadBody),
                "{with_symbol}"
            );
        }
        assert_eq!(parse(&format!("{key}x")), Err(FormatError::BadBody));
    }

    #[test]
    fn prefixes_follow_the_rules() {
        assert!(valid_prefix("kg_live"));
        assert!(valid_prefix("acme2_test"));
        assert!(!valid_prefix(""));
        assert!(!valid_prefix("_kg"));
        assert!(!valid_prefix("kg-live"));
        assert!(!valid_prefix(&"a".repeat(33)));
    }

    #[test]
    fn hash_is_sha256_of_the_whole_key() {
        let h = hash("abc");
        assert_eq!(h[..4], [0xba, 0x78, 0x16, 0xbf]);
    }
}
