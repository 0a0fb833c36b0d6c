//! The whole suite's secret ledger. When `KEYGATE_SECRET_LEDGER` names a folder (the test
//! command sets it), the support code writes there every secret the suite is handed, and
//! everything keygate said or wrote along the way:
//! - every answer the tests read (headers and body), with a hand-out's one secret masked;
//! - everything the CLI printed, with a hand-out's one secret masked;
//! - every log line, of child processes and of gateways running in a test process;
//! - every file a gateway left in its folder: key store, audit log, usage file, config;
//! - what the upstream received.
//!
//! `tests/suite_secrets.rs` then searches all of it for every secret. Without the variable,
//! nothing is written.
//!
//! Files, one set per test process: `<binary>-<pid>.secrets` (one secret a line),
//! `<binary>-<pid>.out` (records, each after a [`RECORD`] line naming it) and
//! `<binary>-<pid>.log` (in-process log lines).
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use http::HeaderMap;
use keygate::keys::format;

/// Starts each record in a `.out` file; the rest of the line names it.
pub const RECORD: &str = "\u{1e}ledger-record ";

/// The ledger's folder, when the suite keeps one.
pub fn dir() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(std::env::var_os("KEYGATE_SECRET_LEDGER")?);
        std::fs::create_dir_all(&dir).expect("the secret ledger's folder can be made");
        Some(dir)
    })
    .as_deref()
}

/// This process's three ledger files.
#[derive(Clone, Copy)]
enum Kind {
    Secrets,
    Out,
    Log,
}

/// This process's file of `kind`, opened once for appending.
fn file(kind: Kind) -> Option<&'static Mutex<File>> {
    static FILES: [OnceLock<Mutex<File>>; 3] = [const { OnceLock::new() }; 3];
    let dir = dir()?;
    Some(FILES[kind as usize].get_or_init(|| {
        let binary = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "tests".into());
        let extension = match kind {
            Kind::Secrets => "secrets",
            Kind::Out => "out",
            Kind::Log => "log",
        };
        let path = dir.join(format!("{binary}-{}.{extension}", std::process::id()));
        let opened = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Mutex::new(opened)
    }))
}

/// Appends `bytes` to this process's file of `kind` in one write.
fn append(kind: Kind, bytes: &[u8]) {
    if let Some(f) = file(kind) {
        f.lock()
            .unwrap()
            .write_all(bytes)
            .expect("the secret ledger takes a write");
    }
}

/// The running test, as far as the thread's name tells (libtest names threads after tests).
fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("unnamed thread")
        .to_string()
}

/// Records a secret the suite was handed (a key, or an admin token: a `kga_` one made by
/// `keygate tokens create`, `POST /v1/admin-tokens` or `keygate init` is checked like a key).
pub fn secret(secret: &str) {
    if dir().is_some() && !secret.is_empty() {
        append(Kind::Secrets, format!("{secret}\n").as_bytes());
    }
}

/// Records something keygate said or wrote, under `label`.
pub fn output(label: &str, content: &[u8]) {
    if dir().is_none() {
        return;
    }
    let label = label.replace(['\n', '\r'], " ");
    let mut record = format!("{RECORD}{label} [{}]\n", test_name()).into_bytes();
    record.extend_from_slice(content);
    record.push(b'\n');
    append(Kind::Out, &record);
}

/// Whether an answer hands out a new secret: a 2xx to a create, regenerate or rotate call
/// on the admin API, or to the creation of an admin token.
pub fn is_hand_out(method: &str, path: &str, status: u16) -> bool {
    let path = path.split('?').next().unwrap_or(path).trim_end_matches('/');
    (200..300).contains(&status)
        && method.eq_ignore_ascii_case("POST")
        && (path == "/v1/api-keys"
            || path == "/v1/admin-tokens"
            || path.ends_with("/regenerate")
            || path.ends_with("/rotate"))
}

/// A hand-out answer's secret (its top-level `key`, or `token` for an admin token), and the
/// body with only that field masked: the secret anywhere else in the same answer is still
/// found.
pub fn split_hand_out(body: &[u8]) -> Option<(String, Vec<u8>)> {
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let field = ["key", "token"].into_iter().find(|f| v.get(f).is_some())?;
    let secret = v.get(field)?.as_str()?.to_string();
    v[field] = "<the secret this answer hands out>".into();
    Some((secret, serde_json::to_vec(&v).ok()?))
}

/// An answer as a record: status line, headers, and the body (a hand-out's secret recorded
/// as one, and masked).
pub fn answer_bytes(
    method: &str,
    path: &str,
    status: u16,
    headers: &[(String, Vec<u8>)],
    body: &[u8],
) -> (Option<String>, Vec<u8>) {
    let mut text = format!("{status}\n").into_bytes();
    for (name, value) in headers {
        text.extend_from_slice(name.as_bytes());
        text.extend_from_slice(b": ");
        text.extend_from_slice(value);
        text.push(b'\n');
    }
    text.push(b'\n');
    let split = is_hand_out(method, path, status)
        .then(|| split_hand_out(body))
        .flatten();
    match split {
        Some((secret, masked)) => {
            text.extend_from_slice(&masked);
            (Some(secret), text)
        }
        None => {
            text.extend_from_slice(body);
            (None, text)
        }
    }
}

/// Records an answer the tests read from keygate.
pub fn answer(method: &str, path: &str, status: u16, headers: &HeaderMap, body: &[u8]) {
    if dir().is_none() {
        return;
    }
    let headers: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
    let (secret, text) = answer_bytes(method, path, status, &headers, body);
    if let Some(s) = secret {
        self::secret(&s);
    }
    output(&format!("answer to {method} {path}"), &text);
}

/// Every well-formed keygate key in `text`.
pub fn keys_in(text: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !word(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && word(bytes[i]) {
            i += 1;
        }
        let run = &text[start..i];
        let body_len = run.len() - run.rfind('_').map_or(0, |u| u + 1);
        if body_len != format::RANDOM_LEN + format::CHECKSUM_LEN {
            continue;
        }
        // The prefix is some tail of what comes before the body; the checksum covers it,
        // so only the true start passes.
        let earliest = run.len().saturating_sub(format::MAX_TOKEN_LEN);
        if let Some(key) = (earliest..run.len())
            .filter(|&s| run.is_char_boundary(s))
            .map(|s| &run[s..])
            .find(|t| format::parse(t).is_ok())
        {
            found.push(key);
        }
    }
    found
}

/// Records what a CLI run printed. A create (of a key or an admin token), regenerate,
/// rotate or init hands out its new secret once on stdout: that one is recorded as a secret
/// and masked; any second copy is not.
pub fn cli(args: &[&str], stdout: &[u8], stderr: &[u8]) {
    if dir().is_none() {
        return;
    }
    let mut out = String::from_utf8_lossy(stdout).into_owned();
    let hands_out = args
        .iter()
        .any(|a| ["create", "regenerate", "rotate", "init"].contains(a));
    if hands_out {
        if let Some(key) = keys_in(&out).first().map(|k| k.to_string()) {
            secret(&key);
            out = out.replacen(&key, "<the secret this command hands out>", 1);
        }
    }
    let label = format!("keygate {}", args.join(" "));
    output(&format!("{label}: stdout"), out.as_bytes());
    output(&format!("{label}: stderr"), stderr);
}

/// Records the lines a child process printed. `demo` prints its key and admin token on
/// stdout for the operator to use: they are recorded as secrets and masked there, and its
/// log (stderr) is searched like any other.
pub fn process(args: &[&str], stdout: &[String], stderr: &[String]) {
    if dir().is_none() {
        return;
    }
    let mut out = stdout.join("\n");
    if args.contains(&"demo") {
        let keys: Vec<String> = keys_in(&out).iter().map(|k| k.to_string()).collect();
        for key in keys {
            secret(&key);
            out = out.replace(&key, "<the demo's key>");
        }
        let token = out
            .split("admin token: ")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .map(str::to_string);
        if let Some(token) = token {
            secret(&token);
            out = out.replace(&token, "<the demo's admin token>");
        }
    }
    let label = format!("keygate {}", args.join(" "));
    output(&format!("{label}: stdout"), out.as_bytes());
    output(&format!("{label}: log"), stderr.join("\n").as_bytes());
}

/// Records every file under `dir` (key store, audit log, usage file, config), as the
/// gateway that used it stops.
pub fn files(owner: &str, dir: &Path) {
    if self::dir().is_none() {
        return;
    }
    let mut pending = vec![(dir.to_path_buf(), 0)];
    while let Some((folder, depth)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() && depth < 3 {
                pending.push((path, depth + 1));
            } else if kind.is_file() {
                if let Ok(bytes) = std::fs::read(&path) {
                    let name = path.strip_prefix(dir).unwrap_or(&path).display();
                    output(&format!("file {name} of {owner}"), &bytes);
                }
            }
        }
    }
}

/// Sends the `keygate` crate's log lines, at every level, to the ledger, for gateways that
/// run inside a test process. Once per process; nothing without a ledger.
pub fn capture_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if file(Kind::Log).is_none() {
            return;
        }
        let _ = tracing_subscriber::fmt()
            .with_writer(|| LogWriter)
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new("keygate=trace"))
            .try_init();
    });
}

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        append(Kind::Log, buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
