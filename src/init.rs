//! `keygate init`: the first hour in one command. It writes a commented config in front of
//! one upstream, an empty SQLite key store, and one admin token, which it prints once and
//! keeps only as its SHA-256. It never overwrites: any file it would write that exists
//! stops it before it writes anything.

use std::io::Write as _;
use std::path::Path;

use crate::keys::{format, hex};

/// Where the config sends every request when `--upstream` is not given.
pub const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:3000";

/// Writes `dir/keygate.yaml` and `dir/keys.db` for `upstream`, and says what to run next.
pub fn run(dir: &Path, upstream: &str) -> Result<(), String> {
    check_upstream(upstream)?;
    let config_path = dir.join("keygate.yaml");
    let store_path = dir.join("keys.db");
    for path in [&config_path, &store_path] {
        if path.exists() {
            return Err(format!(
                "{} exists: keygate init never overwrites; move it away or choose another --dir",
                path.display()
            ));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    let token =
        format::generate_admin_token().map_err(|e| format!("no randomness for a token: {e}"))?;
    let hash = hex(&format::hash(&token));
    let config = config_text(upstream, &hash);
    // `create_new`: a file that appeared since the check above is not overwritten either.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&config_path)
        .map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;
    file.write_all(config.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;
    // The empty store, made by reading it as the gateway will.
    let loaded = crate::config::Config::load(&config_path).map_err(|errors| {
        errors.first().map_or_else(
            || "the written config does not load".to_string(),
            ToString::to_string,
        )
    })?;
    let store = crate::keys::Store::for_config(&loaded, &config_path).map_err(|e| e.to_string())?;
    store.load().map_err(|errors| {
        errors.first().map_or_else(
            || "the key store cannot be made".to_string(),
            ToString::to_string,
        )
    })?;
    let shown = config_path.display();
    println!(
        "Wrote {shown} (every request to {upstream}) and {} (no keys yet).",
        store_path.display()
    );
    println!();
    println!("Admin token, shown this once (only its SHA-256 is in the config):");
    println!();
    println!("    {token}");
    println!();
    println!("Next:");
    println!("    keygate --config {shown} serve");
    println!("    keygate --config {shown} keys create --namespace default --environment production --name first");
    println!("    curl -H \"Authorization: Bearer <the key it printed>\" http://127.0.0.1:8080/");
    println!();
    println!("The console is at http://127.0.0.1:9090/ (sign in with the admin token).");
    Ok(())
}

/// An absolute `http` or `https` URL with a host.
fn check_upstream(upstream: &str) -> Result<(), String> {
    let bad = |why: &str| format!("--upstream: `{upstream}` {why}");
    let uri: http::Uri = upstream
        .parse()
        .map_err(|_| bad("is not a URL such as http://127.0.0.1:3000"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(bad("must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    if upstream.contains(['"', '\n', '\r']) {
        return Err(bad("has characters a config cannot hold"));
    }
    Ok(())
}

fn config_text(upstream: &str, token_hash: &str) -> String {
    format!(
        r#"# keygate config, written by `keygate init`. Every key is documented in README.md
# ("Config reference"). Run `keygate check` after editing; a running gateway reloads this
# file by itself.

listen:
  proxy: 127.0.0.1:8080        # the address your API's clients call
  admin: 127.0.0.1:9090        # the admin API and the console: keep it private

# The key store: SQLite, beside this file. Written by `keygate keys` and the admin API.
store: {{kind: sqlite, path: keys.db}}

# Admin tokens, as the SHA-256 of each (never the token itself). `init` made the first one
# and printed it once.
admin_tokens:
  - {{name: init, hash: "sha256:{token_hash}"}}

routes:
  # Every request goes to your API; keys of other environments get 401 wrong_environment.
  - name: default
    path_prefix: /
    upstream: "{upstream}"
    environment: production
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_absolute_http_urls_are_upstreams() {
        for good in [
            "http://127.0.0.1:3000",
            "https://api.example.com",
            "http://[::1]:80/base",
        ] {
            assert!(check_upstream(good).is_ok(), "{good}");
        }
        for bad in [
            "127.0.0.1:3000",
            "ftp://x",
            "http://",
            "",
            "http://a\"b",
            "/path",
        ] {
            assert!(check_upstream(bad).is_err(), "{bad}");
        }
    }
}
