//! The config and key-store loaders answer any text with a value or located errors.
#![no_main]

use keygate::config::{parse_yaml, Config};
use keygate::keys::StoreFile;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = parse_yaml::<Config>(Path::new("fuzz.yaml"), text) {
        assert!(!errors.is_empty());
    }
    if let Err(errors) = parse_yaml::<StoreFile>(Path::new("keys.yaml"), text) {
        assert!(!errors.is_empty());
    }
});
