//! Scope patterns: any text either parses or is refused with a message; a parsed scope answers
//! any path, and never grants an action above its own.
#![no_main]

use keygate::policy::scope::{Action, Scope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (pattern, path) = text.split_once('\n').unwrap_or((text, "/"));
    for action in ["read", "write", "admin"] {
        if let Ok(scope) = Scope::parse(&format!("{action}:{pattern}")) {
            let granted =
                [Action::Read, Action::Write, Action::Admin].map(|a| scope.allows(a, path));
            // Admin includes write, write includes read.
            assert!(granted[0] >= granted[1] && granted[1] >= granted[2]);
            if action == "read" {
                assert!(!granted[1] && !granted[2]);
            }
        }
    }
});
