//! The key-format check takes any bytes; whatever it accepts, it accepts again unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        if let Ok(parsed) = keygate::keys::format::parse(token) {
            assert_eq!(parsed.token, token);
            assert!(keygate::keys::format::valid_prefix(parsed.prefix));
        }
    }
});
