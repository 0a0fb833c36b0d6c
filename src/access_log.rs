//! The access log: one line per request the proxy and the auth listener answer, as JSON or
//! in nginx's `combined` format.
//!
//! The request path never waits on the disk. It formats its line and appends it to a shared
//! buffer, under a lock held only for that copy; a writer thread takes the whole buffer every
//! [`FLUSH_EVERY`] and writes it. A buffer already holding [`MAX_PENDING`] bytes drops the
//! line, counted in `keygate_access_log_dropped_total`, as are lines a failed write loses.
//! `SIGUSR1` makes the writer reopen its file (after logrotate renamed it), with no line lost:
//! lines taken before the reopen go to the old file, the rest to the new one.
//!
//! No line holds a secret: keys travel in `Authorization` or `X-API-Key`, which are never
//! logged, and the query string is left out unless asked for, and then with the values of
//! credential-like parameters replaced.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, Method, Response, Version};
use serde::{Deserialize, Serialize};

use crate::body::ResponseBody;

/// How often the writer takes what the request path appended.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Bytes waiting for the writer past which lines are dropped: about 10,000 lines.
pub const MAX_PENDING: usize = 4 << 20;

/// `access_log:` in the config.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// A file, relative to the config file, or `-` for standard output. Read at start.
    pub path: String,
    /// `json` (the default) or `combined`.
    #[serde(default)]
    pub format: Format,
    /// The share of accepted requests logged, more than 0 and at most 1. Default 1: every
    /// request. Refusals and upstream errors are always logged.
    #[serde(default = "default_sample")]
    pub sample: f64,
    /// Log the query string, with the values of parameters whose names look like
    /// credentials (`key`, `token`, `secret`, `auth`, `pass`, `sig`, `session`,
    /// `credential`) replaced by `REDACTED`. Default `false`: the path alone.
    #[serde(default)]
    pub query: bool,
}

fn default_sample() -> f64 {
    1.0
}

/// A line's format.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Json,
    /// nginx's `combined`, with the key id as the remote user and no referrer.
    Combined,
}

/// The access log, with its writer thread.
#[derive(Debug)]
pub struct AccessLog {
    format: Format,
    /// Accepted requests logged per million.
    per_million: u64,
    accepted_seen: AtomicU64,
    query: bool,
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    pending: Mutex<Vec<u8>>,
    dropped: AtomicU64,
    reopen: AtomicBool,
    closing: AtomicBool,
    thread: OnceLock<Thread>,
}

/// Where lines go.
#[derive(Debug)]
enum Target {
    Stdout,
    File(PathBuf),
}

impl Target {
    fn open(&self) -> io::Result<Box<dyn io::Write + Send>> {
        Ok(match self {
            Target::Stdout => Box::new(io::stdout()),
            Target::File(path) => {
                Box::new(OpenOptions::new().create(true).append(true).open(path)?)
            }
        })
    }
}

impl AccessLog {
    /// Opens the log (a file is created if missing, and appended to) and starts its writer.
    pub fn open(config: &AccessLogConfig, config_path: &Path) -> io::Result<AccessLog> {
        let target = match config.path.as_str() {
            "-" => Target::Stdout,
            p => Target::File(crate::config::relative_to(config_path, p)),
        };
        let out = target.open()?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Vec::with_capacity(64 << 10)),
            dropped: AtomicU64::new(0),
            reopen: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            thread: OnceLock::new(),
        });
        let writer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || write_loop(&shared, &target, out))?
        };
        let _ = shared.thread.set(writer.thread().clone());
        // Clamped to [0, 1] (the config's range check keeps it in (0, 1]), so the rounded
        // product is a whole number from 0 to 1,000,000: the cast neither truncates nor
        // loses a sign.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let per_million = config.sample.clamp(0.0, 1.0).mul_add(1e6, 0.0).round() as u64;
        Ok(AccessLog {
            format: config.format,
            per_million,
            accepted_seen: AtomicU64::new(0),
            query: config.query,
            shared,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Lines dropped: the writer fell behind, or a write failed.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Asks the writer to reopen its file (`SIGUSR1`).
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Release);
        self.shared.wake();
    }

    /// Writes every line appended so far and stops the writer. Blocking; later lines are
    /// dropped.
    pub fn close(&self) {
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(writer) = writer {
            self.shared.closing.store(true, Ordering::Release);
            self.shared.wake();
            let _ = writer.join();
        }
    }

    /// Starts a request's line with what is known when the request is decided, or `None`
    /// when an accepted request is sampled out.
    pub fn begin(&self, head: &Head<'_>, accepted: bool) -> Option<Pending> {
        if accepted && !self.sampled_in() {
            return None;
        }
        let mut text = Vec::with_capacity(384);
        match self.format {
            Format::Json => self.json_head(head, &mut text),
            Format::Combined => self.combined_head(head, &mut text),
        }
        Some(Pending {
            text,
            format: self.format,
            user_agent: match self.format {
                Format::Combined => head.headers.get(http::header::USER_AGENT).cloned(),
                Format::Json => None,
            },
            shared: Arc::clone(&self.shared),
        })
    }

    fn sampled_in(&self) -> bool {
        if self.per_million >= 1_000_000 {
            return true;
        }
        let n = self.accepted_seen.fetch_add(1, Ordering::Relaxed);
        // The n-th request is logged when the running share crosses a whole line.
        n.wrapping_add(1).wrapping_mul(self.per_million) / 1_000_000
            > n.wrapping_mul(self.per_million) / 1_000_000
    }

    fn json_head(&self, head: &Head<'_>, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"time\":\"");
        write_rfc3339_millis(out, head.time);
        out.extend_from_slice(b"\",\"request_id\":");
        // A request id is keygate's own (hex) or a trusted proxy's of `A-Za-z0-9-_.:` only
        // (`forward::trusted_request_id`): never anything JSON escapes.
        out.push(b'"');
        out.extend_from_slice(head.request_id.as_bytes());
        out.push(b'"');
        out.extend_from_slice(b",\"trace_id\":");
        json_str(out, head.trace_id);
        out.extend_from_slice(b",\"client\":\"");
        push_ip(out, head.client);
        out.extend_from_slice(b"\",\"method\":");
        json_str(out, Some(head.method.as_str()));
        out.extend_from_slice(b",\"path\":\"");
        escape_json(out, head.path);
        if self.query {
            if let Some(q) = head.query {
                out.push(b'?');
                redacted_query(q, |part| escape_json(out, part));
            }
        }
        out.extend_from_slice(b"\",\"route\":");
        json_str(out, head.route);
        out.extend_from_slice(b",\"key_id\":");
        json_str(out, head.key_id);
        out.extend_from_slice(b",\"namespace\":");
        json_str(out, head.namespace);
        out.extend_from_slice(b",\"identity\":");
        json_str(out, head.identity);
        out.extend_from_slice(b",\"bytes_in\":");
        match body_length(head.headers) {
            Some(n) => push_u64(out, n),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"gateway_us\":");
        push_u64(out, micros(head.gateway));
    }

    fn combined_head(&self, head: &Head<'_>, out: &mut Vec<u8>) {
        push_ip(out, head.client);
        out.extend_from_slice(b" - ");
        match head.key_id {
            Some(id) => escape_combined(out, id),
            None => out.push(b'-'),
        }
        out.extend_from_slice(b" [");
        write_common_log_time(out, head.time);
        out.extend_from_slice(b"] \"");
        escape_combined(out, head.method.as_str());
        out.push(b' ');
        escape_combined(out, head.path);
        if self.query {
            if let Some(q) = head.query {
                out.push(b'?');
                redacted_query(q, |part| escape_combined(out, part));
            }
        }
        out.push(b' ');
        out.extend_from_slice(match head.version {
            Version::HTTP_09 => b"HTTP/0.9",
            Version::HTTP_10 => b"HTTP/1.0",
            Version::HTTP_2 => b"HTTP/2.0",
            Version::HTTP_3 => b"HTTP/3.0",
            _ => b"HTTP/1.1",
        });
        out.extend_from_slice(b"\" ");
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.close();
    }
}

impl Shared {
    fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    fn append(&self, line: &[u8]) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if self.closing.load(Ordering::Relaxed)
            || pending.len().saturating_add(line.len()) > MAX_PENDING
        {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.extend_from_slice(line);
    }
}

/// What a line says about a request before it is answered.
#[derive(Debug)]
pub struct Head<'a> {
    pub time: SystemTime,
    pub request_id: &'a HeaderValue,
    /// From a valid `traceparent` (see [`trace_id`]).
    pub trace_id: Option<&'a str>,
    pub client: IpAddr,
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub version: Version,
    pub headers: &'a HeaderMap,
    pub route: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub identity: Option<&'a str>,
    /// The time the gateway spent deciding.
    pub gateway: Duration,
}

/// A started line, finished with the answer: at once for the gateway's own answers, when the
/// body ends (or is abandoned) for a streamed upstream answer.
#[derive(Debug)]
pub struct Pending {
    /// The line so far: always UTF-8, since only text and ASCII go in.
    text: Vec<u8>,
    format: Format,
    user_agent: Option<HeaderValue>,
    shared: Arc<Shared>,
}

/// How a request was answered.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    pub status: u16,
    /// The refusal or gateway error code; `None` for the upstream's own answer.
    pub code: Option<&'static str>,
    /// Until the upstream's response head arrived; `None` when it was not asked.
    pub upstream: Option<Duration>,
    pub bytes_out: u64,
}

impl Pending {
    pub fn finish(mut self, answer: Answer) {
        let out = &mut self.text;
        match self.format {
            Format::Json => {
                out.extend_from_slice(b",\"status\":");
                push_u64(out, u64::from(answer.status));
                out.extend_from_slice(b",\"code\":");
                json_str(out, answer.code);
                out.extend_from_slice(b",\"upstream_us\":");
                match answer.upstream {
                    Some(d) => push_u64(out, micros(d)),
                    None => out.extend_from_slice(b"null"),
                }
                out.extend_from_slice(b",\"bytes_out\":");
                push_u64(out, answer.bytes_out);
                out.extend_from_slice(b"}\n");
            }
            Format::Combined => {
                push_u64(out, u64::from(answer.status));
                out.push(b' ');
                push_u64(out, answer.bytes_out);
                out.extend_from_slice(b" \"-\" \"");
                match &self.user_agent {
                    Some(ua) => escape_combined_bytes(out, ua),
                    None => out.push(b'-'),
                }
                out.extend_from_slice(b"\"\n");
            }
        }
        self.shared.append(&self.text);
    }
}

fn write_loop(shared: &Shared, target: &Target, mut out: Box<dyn io::Write + Send>) {
    let mut batch: Vec<u8> = Vec::with_capacity(64 << 10);
    let mut failing = false;
    loop {
        std::thread::park_timeout(FLUSH_EVERY);
        let closing = shared.closing.load(Ordering::Acquire);
        {
            let mut pending = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut *pending, &mut batch);
        }
        if !batch.is_empty() {
            match out.write_all(&batch).and_then(|()| out.flush()) {
                Ok(()) => failing = false,
                Err(e) => {
                    let lost = batch.iter().filter(|&&b| b == b'\n').count();
                    shared.dropped.fetch_add(lost as u64, Ordering::Relaxed);
                    if !failing {
                        tracing::warn!(error = %e, lines = lost, "the access log could not be written; lines are dropped until it can");
                    }
                    failing = true;
                }
            }
            batch.clear();
            // A burst leaves a large buffer behind: give most of it back.
            batch.shrink_to(1 << 20);
        }
        if shared.reopen.swap(false, Ordering::AcqRel) {
            match target.open() {
                Ok(new) => out = new,
                Err(e) => {
                    tracing::warn!(error = %e, "the access log could not be reopened; writing on to the old file")
                }
            }
        }
        if closing {
            return;
        }
    }
}

/// The trace id of a valid W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, ids not all
/// zero, version not `ff`), or `None`.
pub fn trace_id(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(crate::headers::TRACEPARENT)?.to_str().ok()?;
    valid_traceparent(v).then(|| v.get(3..35)).flatten()
}

fn valid_traceparent(v: &str) -> bool {
    let b = v.as_bytes();
    let hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |s: &[u8]| s.iter().any(|&c| c != b'0');
    // Version 00 is exactly 55 characters; later versions may append fields after a dash.
    b.len() >= 55
        && (b.len() == 55 || (b.get(55) == Some(&b'-') && b.get(0..2) != Some(b"00")))
        && b.get(0..2).is_some_and(|s| hex(s) && s != b"ff")
        && b.get(2) == Some(&b'-')
        && b.get(3..35).is_some_and(|s| hex(s) && nonzero(s))
        && b.get(35) == Some(&b'-')
        && b.get(36..52).is_some_and(|s| hex(s) && nonzero(s))
        && b.get(52) == Some(&b'-')
        && b.get(53..55).is_some_and(hex)
}

/// A new `traceparent` for a request that came without a valid one: its request id (32 hex
/// digits) as the trace id, the id's second half as the parent id, not sampled.
pub fn new_traceparent(request_id: &HeaderValue) -> Option<HeaderValue> {
    let id = request_id.as_bytes();
    let hex = |c: &u8| matches!(c, b'0'..=b'9' | b'a'..=b'f');
    let zero = |s: &[u8]| s.iter().all(|&c| c == b'0');
    let parent = id.get(16..)?;
    if id.len() != 32 || !id.iter().all(hex) || zero(id) || zero(parent) {
        return None;
    }
    let mut text = Vec::with_capacity(55);
    text.extend_from_slice(b"00-");
    text.extend_from_slice(id);
    text.push(b'-');
    text.extend_from_slice(parent);
    text.extend_from_slice(b"-00");
    HeaderValue::from_bytes(&text).ok()
}

/// Finishes `line` with `response`: at once for a body of the gateway's own, when the body
/// ends or is dropped for a streamed one.
pub fn finish(
    response: Response<ResponseBody>,
    line: Option<Pending>,
    code: Option<&'static str>,
    upstream: Option<Duration>,
) -> Response<ResponseBody> {
    let Some(line) = line else {
        return response;
    };
    let answer = Answer {
        status: response.status().as_u16(),
        code,
        upstream,
        bytes_out: 0,
    };
    match response.body() {
        ResponseBody::Full(bytes) => {
            let bytes_out = bytes.as_ref().map_or(0, |b| b.len() as u64);
            line.finish(Answer {
                bytes_out,
                ..answer
            });
            response
        }
        _ => {
            response.map(|body| ResponseBody::Logged(Box::new(LoggedBody::new(body, line, answer))))
        }
    }
}

/// A streamed answer whose line is written when it ends, with the bytes it carried.
#[derive(Debug)]
pub struct LoggedBody {
    pub(crate) inner: ResponseBody,
    line: Option<Pending>,
    answer: Answer,
}

impl LoggedBody {
    fn new(inner: ResponseBody, line: Pending, answer: Answer) -> Self {
        LoggedBody {
            inner,
            line: Some(line),
            answer,
        }
    }

    pub(crate) fn count(&mut self, bytes: usize) {
        self.answer.bytes_out = self.answer.bytes_out.saturating_add(bytes as u64);
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(line) = self.line.take() {
            line.finish(self.answer);
        }
    }
}

/// The request body's declared length: `Content-Length`, 0 without a body, `None` when it
/// is chunked.
fn body_length(headers: &HeaderMap) -> Option<u64> {
    match headers.get(http::header::CONTENT_LENGTH) {
        Some(v) => v.to_str().ok()?.trim().parse().ok(),
        None if headers.contains_key(http::header::TRANSFER_ENCODING) => None,
        None => Some(0),
    }
}

/// Calls `emit` with the pieces of `query`, the values of credential-like parameters
/// replaced by `REDACTED`.
fn redacted_query(query: &str, mut emit: impl FnMut(&str)) {
    const SECRET_WORDS: [&str; 8] = [
        "key",
        "token",
        "secret",
        "auth",
        "pass",
        "sig",
        "session",
        "credential",
    ];
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            emit("&");
        }
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let lower = name.to_ascii_lowercase();
        let secret = SECRET_WORDS.iter().any(|w| lower.contains(w))
            || crate::keys::format::parse(value).is_ok();
        if secret {
            emit(name);
            emit("=REDACTED");
        } else {
            emit(pair);
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Decimal digits, without the formatting machinery (this runs several times a line).
fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start = start.saturating_sub(1);
        if let Some(d) = digits.get_mut(start) {
            *d = b'0'.saturating_add((n % 10) as u8);
        }
        n /= 10;
        if n == 0 || start == 0 {
            break;
        }
    }
    out.extend_from_slice(digits.get(start..).unwrap_or_default());
}

/// `n` as at least `width` digits, zero-padded.
fn push_padded(out: &mut Vec<u8>, n: u64, width: usize) {
    let mut digits: usize = 1;
    let mut rest = n / 10;
    while rest > 0 {
        digits = digits.saturating_add(1);
        rest /= 10;
    }
    for _ in digits..width {
        out.push(b'0');
    }
    push_u64(out, n);
}

fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                let digit = |d: u8| b'0'.saturating_add(d % 10);
                if octet >= 100 {
                    out.push(digit(octet / 100));
                }
                if octet >= 10 {
                    out.push(digit(octet / 10));
                }
                out.push(digit(octet));
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// A JSON string, or `null`.
fn json_str(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        Some(t) => {
            out.push(b'"');
            escape_json(out, t);
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// JSON string content: quotes, backslashes and control characters escaped, the rest copied
/// in runs as it is (valid UTF-8 already), so a line is always valid JSON.
fn escape_json(out: &mut Vec<u8>, text: &str) {
    let mut rest = text;
    while let Some(at) = rest
        .bytes()
        .position(|b| b < 0x20 || b == 0x7f || b == b'"' || b == b'\\')
    {
        // The byte found is ASCII, so both slices start and end on characters.
        out.extend_from_slice(rest.get(..at).unwrap_or_default().as_bytes());
        match rest.as_bytes().get(at).copied().unwrap_or(b' ') {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        rest = rest.get(at.saturating_add(1)..).unwrap_or_default();
    }
    out.extend_from_slice(rest.as_bytes());
}

/// Text inside a combined line's quotes, escaped as nginx does: `"`, `\`, and every byte
/// outside visible ASCII as `\xHH`.
fn escape_combined(out: &mut Vec<u8>, text: &str) {
    let escape = |out: &mut Vec<u8>, b: u8| {
        let _ = write!(out, "\\x{b:02X}");
    };
    let mut rest = text;
    while let Some(at) = rest
        .bytes()
        .position(|b| !(0x20..=0x7e).contains(&b) || b == b'"' || b == b'\\')
    {
        out.extend_from_slice(rest.get(..at).unwrap_or_default().as_bytes());
        // A character outside ASCII is escaped byte by byte, as nginx writes it.
        let tail = rest.get(at..).unwrap_or_default();
        let width = tail.chars().next().map_or(1, char::len_utf8);
        for &b in tail.as_bytes().iter().take(width) {
            escape(out, b);
        }
        rest = tail.get(width..).unwrap_or_default();
    }
    out.extend_from_slice(rest.as_bytes());
}

/// A header's value inside a combined line's quotes: it may hold any byte.
fn escape_combined_bytes(out: &mut Vec<u8>, value: &HeaderValue) {
    match value.to_str() {
        Ok(text) => escape_combined(out, text),
        Err(_) => {
            for &b in value.as_bytes() {
                if (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\' {
                    out.push(b);
                } else {
                    let _ = write!(out, "\\x{b:02X}");
                }
            }
        }
    }
}

/// The text of one second, as each format writes it, kept per thread: lines in the same
/// second (nearly all of them) copy it instead of computing a calendar date.
#[derive(Default)]
struct SecondText {
    second: Option<i64>,
    rfc3339: String,
    common: String,
}

thread_local! {
    static SECOND: std::cell::RefCell<SecondText> = std::cell::RefCell::default();
}

fn with_second<R>(t: SystemTime, f: impl FnOnce(&SecondText, u32) -> R) -> R {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let second = i64::try_from(d.as_secs()).unwrap_or(0);
    SECOND.with(|cell| {
        let mut text = cell.borrow_mut();
        if text.second != Some(second) {
            const MONTHS: [&str; 12] = [
                "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
            ];
            // `2026-12-07T03:20:00Z`, cut into the pieces both formats need.
            let whole = UNIX_EPOCH
                .checked_add(Duration::from_secs(d.as_secs()))
                .unwrap_or(UNIX_EPOCH);
            let iso = humantime::format_rfc3339_seconds(whole).to_string();
            let part = |from: usize, to: usize| iso.get(from..to).unwrap_or("00");
            let month = part(5, 7).parse::<usize>().unwrap_or(1);
            let name = MONTHS.get(month.saturating_sub(1)).unwrap_or(&"Jan");
            text.rfc3339.clear();
            text.rfc3339.push_str(part(0, 19));
            text.common.clear();
            let _ = write!(
                text.common,
                "{}/{name}/{}:{} +0000",
                part(8, 10),
                part(0, 4),
                part(11, 19)
            );
            text.second = Some(second);
        }
        f(&text, d.subsec_millis())
    })
}

/// `2026-12-07T03:20:00.123Z`.
pub(crate) fn write_rfc3339_millis(out: &mut Vec<u8>, t: SystemTime) {
    with_second(t, |text, ms| {
        out.extend_from_slice(text.rfc3339.as_bytes());
        out.push(b'.');
        push_padded(out, u64::from(ms), 3);
        out.push(b'Z');
    });
}

/// `07/Dec/2026:03:20:00 +0000`.
fn write_common_log_time(out: &mut Vec<u8>, t: SystemTime) {
    with_second(t, |text, _| out.extend_from_slice(text.common.as_bytes()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: &[u8]) -> &str {
        std::str::from_utf8(bytes).unwrap()
    }

    #[test]
    fn civil_dates_match_known_times() {
        let at = |secs: u64| UNIX_EPOCH + Duration::from_millis(secs);
        let mut s = Vec::new();
        write_rfc3339_millis(&mut s, at(0));
        assert_eq!(text(&s), "1970-01-01T00:00:00.000Z");
        s.clear();
        // 2024-02-29T12:34:56.789Z, a leap day.
        write_rfc3339_millis(&mut s, at(1_709_210_096_789));
        assert_eq!(text(&s), "2024-02-29T12:34:56.789Z");
        s.clear();
        write_common_log_time(&mut s, at(1_796_527_200_000));
        assert_eq!(text(&s), "06/Dec/2026:03:20:00 +0000");
        // Every day for 600 years agrees with humantime's formatting.
        for day in (0..219_000u64).step_by(7) {
            let t = UNIX_EPOCH + Duration::from_secs(day * 86_400 + 3_723);
            let mut ours = Vec::new();
            write_rfc3339_millis(&mut ours, t);
            assert_eq!(text(&ours), humantime::format_rfc3339_millis(t).to_string());
        }
    }

    #[test]
    fn traceparents_are_checked_before_their_trace_id_is_used() {
        let mut h = HeaderMap::new();
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert("traceparent", HeaderValue::from_static(good));
        assert_eq!(trace_id(&h), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "",
        ] {
            h.insert("traceparent", HeaderValue::from_static(bad));
            assert_eq!(trace_id(&h), None, "{bad}");
        }
        h.insert(
            "traceparent",
            HeaderValue::from_static("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x"),
        );
        assert!(trace_id(&h).is_some(), "a later version may carry more");
        let id = HeaderValue::from_static("0123456789abcdef0123456789abcdef");
        let made = new_traceparent(&id).expect("made");
        assert_eq!(
            made,
            "00-0123456789abcdef0123456789abcdef-0123456789abcdef-00"
        );
        h.insert("traceparent", made);
        assert!(trace_id(&h).is_some());
    }

    #[test]
    fn a_full_buffer_drops_lines_and_counts_them() {
        let shared = Shared {
            pending: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
            reopen: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            thread: OnceLock::new(),
        };
        let line = [b'x'; 1000];
        // No writer takes the buffer: it fills, then every further line is dropped.
        for _ in 0..(MAX_PENDING / line.len() + 10) {
            shared.append(&line);
        }
        let kept = shared.pending.lock().unwrap().len();
        assert_eq!(kept, MAX_PENDING / line.len() * line.len());
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 10);
        shared.closing.store(true, Ordering::Relaxed);
        shared.append(b"late\n");
        assert_eq!(
            shared.dropped.load(Ordering::Relaxed),
            11,
            "nothing is taken once closed"
        );
    }

    #[test]
    fn close_writes_every_line_appended_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = AccessLogConfig {
            path: "a.log".into(),
            format: Format::Json,
            sample: 1.0,
            query: false,
        };
        let log = AccessLog::open(&config, &dir.path().join("keygate.yaml")).unwrap();
        for i in 0..1000 {
            log.shared.append(format!("{i}\n").as_bytes());
        }
        log.close();
        let text = std::fs::read_to_string(dir.path().join("a.log")).unwrap();
        assert_eq!(text.lines().count(), 1000);
        assert_eq!(log.dropped(), 0);
    }

    #[test]
    fn credential_like_query_values_are_redacted() {
        let mut out = String::new();
        redacted_query("page=2&api_key=abc&Token=t&q=x%20y&flag", |p| {
            out.push_str(p)
        });
        assert_eq!(out, "page=2&api_key=REDACTED&Token=REDACTED&q=x%20y&flag");
    }

    #[test]
    fn numbers_and_addresses_are_written_by_hand_as_fmt_would() {
        for n in [0, 7, 10, 999, 1_000_000, u64::MAX] {
            let mut out = Vec::new();
            push_u64(&mut out, n);
            assert_eq!(text(&out), n.to_string());
            out.clear();
            push_padded(&mut out, n, 3);
            assert_eq!(text(&out), format!("{n:03}"));
        }
        for ip in ["10.0.0.255", "0.0.0.0", "192.168.100.9", "2001:db8::1"] {
            let mut out = Vec::new();
            push_ip(&mut out, ip.parse().unwrap());
            assert_eq!(text(&out), ip);
        }
    }

    #[test]
    fn escaping_keeps_lines_whole() {
        let mut j = Vec::new();
        escape_json(&mut j, "a\"b\\c\n\u{7f}é/x");
        assert_eq!(text(&j), "a\\\"b\\\\c\\u000a\\u007fé/x");
        let line = format!("{{\"p\":\"{}\"}}", text(&j));
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            parsed["p"], "a\"b\\c\n\u{7f}é/x",
            "JSON gives back what was escaped"
        );
        let mut c = Vec::new();
        escape_combined(&mut c, "a\"b\né");
        assert_eq!(text(&c), "a\\x22b\\x0A\\xC3\\xA9");
        let mut ua = Vec::new();
        escape_combined_bytes(&mut ua, &HeaderValue::from_bytes(b"x\xffy").unwrap());
        assert_eq!(text(&ua), "x\\xFFy");
    }
}
