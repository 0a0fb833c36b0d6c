//! The whole suite's secret scan. The test command runs every suite with
//! `KEYGATE_SECRET_LEDGER` set, so each writes to the ledger the secrets it was handed and
//! everything keygate said or wrote (`support/ledger.rs`): every answer the tests read, every
//! CLI output, every log line, every key store, audit log, usage file and config a gateway
//! left, and what the upstream received. The API conformance run adds its gateway's log and
//! files and schemathesis's record of every answer. Then this scan searches all of it for:
//! - any 16 characters of a secret's random part (so a key cut short or wrapped is found);
//! - any well-formed keygate key at all: one the ledger did not hear of is still a key;
//! - any admin token.
//!
//! The answer that hands a secret out holds it once, masked in the ledger; a second copy in
//! the same answer is a finding.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use keygate::keys::format;
use support::ledger::{self, RECORD};

/// Characters of a secret that, found together, count as the secret leaking: 16 base62
/// characters are 95 bits, which no text holds by chance.
const WINDOW: usize = 16;

/// What the suite was handed.
#[derive(Default)]
struct Secrets {
    /// Every 16-character piece of each key's random part, to the key it is from.
    pieces: HashMap<[u8; WINDOW], usize>,
    keys: Vec<String>,
    /// Admin tokens and any other secret that is not a keygate key.
    tokens: Vec<String>,
}

impl Secrets {
    fn add(&mut self, secret: &str) {
        let secret = secret.trim();
        if secret.is_empty() || self.keys.iter().chain(&self.tokens).any(|s| s == secret) {
            return;
        }
        match format::parse(secret) {
            Ok(_) => {
                let body = &secret.as_bytes()[secret.rfind('_').map_or(0, |u| u + 1)..];
                for piece in body.windows(WINDOW) {
                    self.pieces
                        .insert(piece.try_into().unwrap(), self.keys.len());
                }
                self.keys.push(secret.to_string());
            }
            Err(_) => self.tokens.push(secret.to_string()),
        }
    }
}

/// A key shown only as much as its public prefix and four characters, so the report of a
/// leak does not leak it again.
fn shown(key: &str) -> String {
    let at = key.rfind('_').map_or(0, |u| u + 1);
    format!("{}{}…", &key[..at], &key[at..(at + 4).min(key.len())])
}

/// Every leak in `text`, described.
fn leaks(text: &[u8], secrets: &Secrets) -> Vec<String> {
    let mut found = Vec::new();
    // Runs of base62 characters long enough to hold a piece.
    let mut i = 0;
    while i < text.len() {
        if !text[i].is_ascii_alphanumeric() {
            i += 1;
            continue;
        }
        let start = i;
        while i < text.len() && text[i].is_ascii_alphanumeric() {
            i += 1;
        }
        if let Some(&k) = text[start..i]
            .windows(WINDOW)
            .find_map(|w| secrets.pieces.get(w))
        {
            found.push(format!(
                "16 or more characters of the secret {}",
                shown(&secrets.keys[k])
            ));
        }
    }
    let lossy = String::from_utf8_lossy(text);
    for key in ledger::keys_in(&lossy) {
        found.push(format!("the well-formed key {}", shown(key)));
    }
    for token in &secrets.tokens {
        if lossy.contains(token.as_str()) {
            found.push(format!(
                "a token the suite holds secret ({} characters)",
                token.len()
            ));
        }
    }
    found.dedup();
    found
}

/// One thing keygate said or wrote: where it is, and its bytes.
struct Record {
    source: String,
    bytes: Vec<u8>,
}

/// What each kind of record adds up to, for the report.
#[derive(Default)]
struct Tally {
    records: u64,
    lines: u64,
    bytes: u64,
}

/// Splits a `.out` file into its records.
fn records_of(path: &Path, bytes: &[u8]) -> Vec<Record> {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let marker = RECORD.as_bytes();
    let mut starts: Vec<usize> = bytes
        .windows(marker.len())
        .enumerate()
        .filter(|(i, w)| *w == marker && (*i == 0 || bytes[i - 1] == b'\n'))
        .map(|(i, _)| i)
        .collect();
    starts.push(bytes.len());
    starts
        .windows(2)
        .map(|span| {
            let record = &bytes[span[0]..span[1]];
            let head_end = record
                .iter()
                .position(|&b| b == b'\n')
                .unwrap_or(record.len());
            let label = String::from_utf8_lossy(&record[marker.len()..head_end]).into_owned();
            Record {
                source: format!("{name}: {label}"),
                bytes: record[(head_end + 1).min(record.len())..].to_vec(),
            }
        })
        .collect()
}

/// The answers in schemathesis's HAR file as records, with hand-out secrets taken out.
fn har_records(path: &Path, bytes: &[u8], secrets: &mut Secrets) -> Vec<Record> {
    let har: serde_json::Value = serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("{} is not HAR: {e}", path.display()));
    let entries = har["log"]["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    entries
        .iter()
        .map(|entry| {
            let method = entry["request"]["method"].as_str().unwrap_or_default();
            let url = entry["request"]["url"].as_str().unwrap_or_default();
            let path = url
                .splitn(4, '/')
                .nth(3)
                .map_or("/".to_string(), |p| format!("/{p}"));
            let response = &entry["response"];
            let status = response["status"].as_u64().unwrap_or(0) as u16;
            let headers: Vec<(String, Vec<u8>)> = response["headers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|h| {
                    (
                        h["name"].as_str().unwrap_or_default().to_string(),
                        h["value"].as_str().unwrap_or_default().as_bytes().to_vec(),
                    )
                })
                .collect();
            let body = response["content"]["text"].as_str().unwrap_or_default();
            let (secret, text) =
                ledger::answer_bytes(method, &path, status, &headers, body.as_bytes());
            if let Some(s) = secret {
                secrets.add(&s);
            }
            Record {
                source: format!("conformance.har: answer to {method} {path}"),
                bytes: text,
            }
        })
        .collect()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                all.push(path);
            }
        }
    }
    all.sort();
    all
}

/// What a scan of a ledger found, and what it searched.
struct Scan {
    secrets: Secrets,
    tally: BTreeMap<&'static str, Tally>,
    findings: Vec<String>,
}

/// The kind of a record, by its label (less the test's name), for the report.
fn kind(source: &str) -> &'static str {
    let source = source.rsplit_once(" [").map_or(source, |(label, _)| label);
    if source.contains(": answer to ") {
        if source.starts_with("conformance.har") {
            "schemathesis's answers"
        } else {
            "answers the tests read"
        }
    } else if source.contains(": file ") {
        "files gateways left (store, audit, usage, config)"
    } else if source.contains(": what the upstream received") {
        "what the upstream received"
    } else if source.ends_with(": log") || source.contains(".log") {
        "log lines"
    } else if source.contains(": keygate ") {
        "CLI and process output"
    } else if source.starts_with("conformance/") {
        "files the conformance gateway left"
    } else {
        "other output"
    }
}

fn scan(dir: &Path) -> Scan {
    let mut secrets = Secrets::default();
    secrets.add(support::ADMIN_TOKEN);
    let files = files_under(dir);
    // Every secret first, from the ledger and from schemathesis's hand-outs, so that a secret
    // handed out late is still found in output written early.
    let mut records = Vec::new();
    for path in &files {
        let bytes = std::fs::read(path).unwrap();
        let name = path.strip_prefix(dir).unwrap().display().to_string();
        match path.extension().and_then(|e| e.to_str()) {
            Some("secrets") => String::from_utf8_lossy(&bytes)
                .lines()
                .for_each(|s| secrets.add(s)),
            Some("out") => records.extend(records_of(path, &bytes)),
            Some("har") => records.extend(har_records(path, &bytes, &mut secrets)),
            _ => records.push(Record {
                source: name,
                bytes,
            }),
        }
    }
    let mut tally: BTreeMap<&'static str, Tally> = BTreeMap::new();
    let mut findings = Vec::new();
    for record in &records {
        let t = tally.entry(kind(&record.source)).or_default();
        t.records += 1;
        t.lines += record.bytes.iter().filter(|&&b| b == b'\n').count() as u64;
        t.bytes += record.bytes.len() as u64;
        for leak in leaks(&record.bytes, &secrets) {
            findings.push(format!("{leak} in {}", record.source));
        }
    }
    Scan {
        secrets,
        tally,
        findings,
    }
}

#[test]
#[ignore = "run by the test command after every other suite, with KEYGATE_SECRET_LEDGER set"]
fn no_secret_the_suite_made_appears_in_anything_keygate_said_or_wrote() {
    let dir = ledger::dir().expect("KEYGATE_SECRET_LEDGER names the ledger the suites wrote");
    let scan = scan(dir);
    eprintln!(
        "secret scan of {}: {} keys and {} tokens searched for",
        dir.display(),
        scan.secrets.keys.len(),
        scan.secrets.tokens.len()
    );
    for (kind, t) in &scan.tally {
        eprintln!(
            "  {kind}: {} records, {} lines, {} bytes",
            t.records, t.lines, t.bytes
        );
    }
    assert!(
        scan.findings.is_empty(),
        "{} leaks:\n{}",
        scan.findings.len(),
        scan.findings.join("\n")
    );
    // The scan is only as good as what it was fed: every kind of output, from the whole suite.
    for kind in [
        "answers the tests read",
        "schemathesis's answers",
        "CLI and process output",
        "log lines",
        "files gateways left (store, audit, usage, config)",
        "files the conformance gateway left",
        "what the upstream received",
    ] {
        assert!(
            scan.tally.get(kind).is_some_and(|t| t.records > 0),
            "the ledger holds no {kind}: did the whole suite run with KEYGATE_SECRET_LEDGER?"
        );
    }
    assert!(
        scan.secrets.keys.len() >= 500,
        "only {} secrets in the ledger",
        scan.secrets.keys.len()
    );
}

/// The scan itself, on a ledger made here: it finds each kind of leak, and nothing in a
/// clean hand-out.
#[test]
fn the_scan_finds_every_kind_of_leak() {
    let dir = tempfile::tempdir().unwrap();
    let key = format::generate("kg_live").unwrap();
    let unrecorded = format::generate("kg_test").unwrap();
    let body_start = key.rfind('_').unwrap() + 1;
    let piece = &key[body_start + 5..body_start + 5 + WINDOW];
    let hand_out = serde_json::json!({"id": "k1", "key": key}).to_string();
    let twice = serde_json::json!({"id": "k1", "key": key, "note": key}).to_string();
    let out = |label: &str, content: &str| format!("{RECORD}{label}\n{content}\n");
    std::fs::write(dir.path().join("t-1.secrets"), format!("{key}\n")).unwrap();
    std::fs::write(
        dir.path().join("t-1.out"),
        [
            out("clean answer", "{\"code\":\"unknown_key\"}"),
            out("piece", &format!("…{piece}…")),
            out("unrecorded", &format!("Bearer {unrecorded}")),
            out("token", &format!("x{}x", support::ADMIN_TOKEN)),
        ]
        .concat(),
    )
    .unwrap();
    std::fs::write(dir.path().join("t-1.log"), format!("refused key={key}\n")).unwrap();
    let har_at = |path: &str, body: &str| {
        serde_json::json!({"request": {"method": "POST", "url": format!("http://127.0.0.1:1{path}")},
            "response": {"status": 201, "headers": [], "content": {"text": body}}})
    };
    let har = |body: &str| har_at("/v1/api-keys", body);
    // An admin token's hand-out holds it as `token`: masked there, and a secret from then on.
    let admin_token = format::generate_admin_token().unwrap();
    let token_out = serde_json::json!({"name": "ci", "token": admin_token}).to_string();
    std::fs::write(
        dir.path().join("conformance.har"),
        serde_json::json!({"log": {"entries": [
            har(&hand_out),
            har(&twice),
            har_at("/v1/admin-tokens", &token_out),
        ]}})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("t-2.out"),
        format!("{RECORD}token echoed\nlast used by {admin_token}\n"),
    )
    .unwrap();

    let scan = scan(dir.path());
    let mut sources: Vec<&str> = scan
        .findings
        .iter()
        .map(|f| f.rsplit_once(" in ").unwrap().1)
        .collect();
    sources.sort_unstable();
    sources.dedup();
    assert_eq!(
        sources,
        [
            "conformance.har: answer to POST /v1/api-keys",
            "t-1.log",
            "t-1.out: piece",
            "t-1.out: token",
            "t-1.out: unrecorded",
            "t-2.out: token echoed",
        ],
        "{:#?}",
        scan.findings
    );
    // The one clean hand-out gave nothing; the answer with a second copy gave findings.
    assert_eq!(
        scan.findings
            .iter()
            .filter(|f| f.contains("conformance.har"))
            .count(),
        2,
        "{:#?}",
        scan.findings
    );
    assert!(scan
        .findings
        .iter()
        .all(|f| !f.contains(&key[body_start..])));
}
