//! The access log: one line per request the proxy and the auth listener answer, as JSON or
//! in nginx's `combined` format.
//!
//! The request path never waits on the disk. It formats its line and appends it to a shared
//! queue of blocks, under a lock held only for that copy. A writer thread is woken when a
//! block of [`BLOCK`] bytes fills, and at least every [`FLUSH_EVERY`]; it takes every block
//! waiting and writes them. A queue already holding [`MAX_PENDING`] bytes drops the line,
//! counted in `keygate_access_log_dropped_total`, as are lines a failed write loses.
//!
//! The writer hands its emptied blocks back for reuse, so a busy gateway appends into the
//! same few blocks, still in the core's cache, where one buffer taken every 100 ms grew to
//! megabytes of memory the cache did not hold (and was copied as it grew).
//!
//! `SIGUSR1` makes the writer reopen its file (after logrotate renamed it), with no line lost:
//! lines taken before the reopen go to the old file, the rest to the new one.
//!
//! One shared queue keeps the lines in the order they end, whichever thread ends them. Per
//! thread buffers were tried: they cost as many instructions a line (an uncontended lock is
//! two atomic operations) and put the lines of two threads out of order.
//!
//! A line costs no allocation: it is begun in a buffer from a small per-thread stock, which
//! it goes back to once the line is appended, and its streamed body is counted in place.
//!
//! No line holds a secret: keys travel in `Authorization` or `X-API-Key`, which are never
//! logged, and the query string is left out unless asked for, and then with the values of
//! credential-like parameters replaced.

use std::cell::{Cell, RefCell};
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
/// Bytes waiting for the writer past which lines are dropped: about 13,000 JSON lines.
pub const MAX_PENDING: usize = 4 << 20;
/// The lines the writer is woken for: about 200 lines, a few hundred wakes a second at
/// 100,000 requests a second.
const BLOCK: usize = 64 << 10;
/// Emptied blocks kept for reuse; more are let go, after a burst.
const SPARE_BLOCKS: usize = 4;
/// A line buffer's first capacity: a line with a long path or user agent grows its own.
const LINE_CAPACITY: usize = 384;

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
    format: Format,
    pending: Mutex<Queue>,
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
        let shared = Arc::new(Shared::new(config.format));
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
        let mut line = spare_line();
        let text = &mut line.text;
        self.push_head(head, text);
        line.split = text.len();
        push_tail(self.format, head, text);
        line.shared = Some(Arc::clone(&self.shared));
        Some(Pending(line))
    }

    /// Writes the whole line of an answer the gateway made itself (a refusal), straight
    /// into the queue: no line buffer, and no second copy of the line.
    pub fn answered(&self, head: &Head<'_>, response: &Response<ResponseBody>, code: &'static str) {
        let answer = Answer {
            status: response.status().as_u16(),
            code: Some(code),
            upstream: None,
            bytes_out: own_body_len(response.body()),
        };
        // What varies in a line's length; the rest is under 300 bytes.
        let len = [
            head.request_id.len(),
            head.path.len(),
            head.query.map_or(0, str::len),
            head.route.map_or(0, str::len),
            head.identity.map_or(0, str::len),
        ]
        .iter()
        .fold(384usize, |sum, n| sum.saturating_add(*n));
        self.shared.append(len, |out| {
            self.push_head(head, out);
            push_answer(self.format, &answer, out);
            push_tail(self.format, head, out);
        });
    }

    /// The line up to the answer.
    fn push_head(&self, head: &Head<'_>, out: &mut Vec<u8>) {
        match self.format {
            Format::Json => self.json_head(head, out),
            Format::Combined => self.combined_head(head, out),
        }
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

    /// The line up to the answer. Each constant piece carries the end of one field and the
    /// start of the next, so that a line is a few copies of known sizes: the pieces, not the
    /// bytes, are what a line costs.
    fn json_head(&self, head: &Head<'_>, out: &mut Vec<u8>) {
        // `{"time":"…","request_id":"`
        json_time(out, head.time);
        // A request id is keygate's own (hex) or a trusted proxy's of `A-Za-z0-9-_.:` only
        // (`forward::trusted_request_id`), a method is an HTTP token (`http` checks it), a
        // key id is hex and a namespace of `a-z0-9_-` (checked before a key enters a
        // snapshot), a trace id hex (`trace_id`), an address digits, dots and colons: none is
        // anything JSON escapes.
        out.extend_from_slice(head.request_id.as_bytes());
        match trace_id(head.headers) {
            Some(id) => {
                out.extend_from_slice(b"\",\"trace_id\":\"");
                out.extend_from_slice(id.as_bytes());
                out.extend_from_slice(b"\",\"client\":\"");
            }
            None => out.extend_from_slice(b"\",\"trace_id\":null,\"client\":\""),
        }
        push_client(out, head);
        if *head.method == Method::GET {
            out.extend_from_slice(b"\",\"method\":\"GET\",\"path\":\"");
        } else {
            out.extend_from_slice(b"\",\"method\":\"");
            out.extend_from_slice(head.method.as_str().as_bytes());
            out.extend_from_slice(b"\",\"path\":\"");
        }
        escape_json(out, head.path);
        if self.query {
            if let Some(q) = head.query {
                out.push(b'?');
                redacted_query(q, |part| escape_json(out, part));
            }
        }
        match head.route {
            Some(route) => {
                out.extend_from_slice(b"\",\"route\":\"");
                escape_json(out, route);
                out.push(b'"');
            }
            None => out.extend_from_slice(b"\",\"route\":null"),
        }
        plain_or_null(out, b",\"key_id\":", head.key_id);
        plain_or_null(out, b",\"namespace\":", head.namespace.map(str::as_bytes));
        match head.identity {
            Some(identity) => {
                out.extend_from_slice(b",\"identity\":\"");
                escape_json(out, identity);
                out.extend_from_slice(b"\",\"bytes_in\":");
            }
            None => out.extend_from_slice(b",\"identity\":null,\"bytes_in\":"),
        }
        match head.bytes_in {
            Some(n) => {
                push_u64(out, n);
                out.extend_from_slice(b",\"gateway_us\":");
            }
            None => out.extend_from_slice(b"null,\"gateway_us\":"),
        }
        push_u64(out, micros(head.gateway));
    }

    fn combined_head(&self, head: &Head<'_>, out: &mut Vec<u8>) {
        push_client(out, head);
        out.extend_from_slice(b" - ");
        match head.key_id {
            // Hex digits: nothing to escape.
            Some(id) => out.extend_from_slice(id),
            None => out.push(b'-'),
        }
        out.extend_from_slice(b" [");
        write_common_log_time(out, head.time);
        out.extend_from_slice(b"] \"");
        // An HTTP token: visible ASCII without quotes or backslashes.
        out.extend_from_slice(head.method.as_str().as_bytes());
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

    fn new(format: Format) -> Shared {
        Shared {
            format,
            pending: Mutex::new(Queue::default()),
            dropped: AtomicU64::new(0),
            reopen: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            thread: OnceLock::new(),
        }
    }

    /// Appends a line of about `len` bytes, which `write` writes straight into the open
    /// block; drops it when the queue is full or the log closed. Wakes the writer when the
    /// line begins a new block.
    fn append(&self, len: usize, write: impl FnOnce(&mut Vec<u8>)) {
        let mut queue = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if self.closing.load(Ordering::Relaxed) || queue.bytes.saturating_add(len) > MAX_PENDING {
            drop(queue);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let sealed = queue.open.len().saturating_add(len) > BLOCK && !queue.open.is_empty();
        if sealed {
            queue.seal();
        }
        let before = queue.open.len();
        write(&mut queue.open);
        let added = queue.open.len().saturating_sub(before);
        queue.bytes = queue.bytes.saturating_add(added);
        drop(queue);
        if sealed {
            self.wake();
        }
    }
}

/// The lines waiting for the writer, in blocks, and the blocks it emptied.
#[derive(Debug, Default)]
struct Queue {
    /// The block lines are appended to.
    open: Vec<u8>,
    /// Blocks filled and waiting, oldest first.
    full: Vec<Vec<u8>>,
    /// Bytes in `open` and `full`.
    bytes: usize,
    /// Emptied blocks, for reuse.
    spare: Vec<Vec<u8>>,
}

impl Queue {
    /// Puts the open block in line for the writer and opens another.
    fn seal(&mut self) {
        let next = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BLOCK));
        let full = std::mem::replace(&mut self.open, next);
        self.full.push(full);
    }

    /// Moves every waiting line, in order, into `taken`.
    fn take(&mut self, taken: &mut Vec<Vec<u8>>) {
        if !self.open.is_empty() {
            self.seal();
        }
        taken.append(&mut self.full);
        self.bytes = 0;
    }

    /// Takes emptied blocks back, keeping a few of the usual size.
    fn give_back(&mut self, emptied: &mut Vec<Vec<u8>>) {
        for mut block in emptied.drain(..) {
            if self.spare.len() < SPARE_BLOCKS && block.capacity() <= 2 * BLOCK {
                block.clear();
                self.spare.push(block);
            }
        }
    }
}

thread_local! {
    /// Lines ready for reuse, at most [`SPARE_LINES`]. Boxed: a line is handed on as its box,
    /// which is what is kept.
    #[allow(clippy::vec_box)]
    static SPARE: RefCell<Vec<Box<Line>>> = const { RefCell::new(Vec::new()) };
}
const SPARE_LINES: usize = 64;

/// An empty line: a spare one of this thread, or a new one.
fn spare_line() -> Box<Line> {
    SPARE
        .try_with(|spare| spare.try_borrow_mut().ok().and_then(|mut s| s.pop()))
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            Box::new(Line {
                text: Vec::with_capacity(LINE_CAPACITY),
                split: 0,
                answer: Answer {
                    status: 0,
                    code: None,
                    upstream: None,
                    bytes_out: 0,
                },
                shared: None,
            })
        })
}

/// Keeps a written line for the next one; one a long line grew is let go.
fn give_back(mut line: Box<Line>) {
    if line.text.capacity() > LINE_CAPACITY.saturating_mul(4) {
        return;
    }
    line.text.clear();
    line.shared = None;
    let _ = SPARE.try_with(|spare| {
        if let Ok(mut spare) = spare.try_borrow_mut() {
            if spare.len() < SPARE_LINES {
                spare.push(line);
            }
        }
    });
}

/// What a line says about a request before it is answered.
#[derive(Debug)]
pub struct Head<'a> {
    pub time: SystemTime,
    pub request_id: &'a HeaderValue,
    pub client: IpAddr,
    /// `client` as text, when the connection has it already (the client is the peer): copied
    /// rather than formatted again for every line.
    pub client_text: Option<&'a [u8]>,
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub version: Version,
    /// The trace id (of a valid `traceparent`, see [`trace_id`]) and the user agent are read
    /// from these.
    pub headers: &'a HeaderMap,
    /// The request body's length when it is known (`Content-Length`, or no body); `None`
    /// when chunked.
    pub bytes_in: Option<u64>,
    pub route: Option<&'a str>,
    /// The key id's bytes: hex digits (taken as they are, without a UTF-8 check).
    pub key_id: Option<&'a [u8]>,
    pub namespace: Option<&'a str>,
    pub identity: Option<&'a str>,
    /// The time the gateway spent deciding.
    pub gateway: Duration,
}

/// A started line, finished with the answer: at once for the gateway's own answers, when the
/// body ends (or is abandoned) for a streamed upstream answer. One pointer: it travels in the
/// response body, which the request path moves several times.
#[derive(Debug)]
pub struct Pending(Box<Line>);

#[derive(Debug)]
struct Line {
    /// The line but the answer's fields, which go in at `split`: always UTF-8, since only
    /// text and ASCII go in.
    text: Vec<u8>,
    split: usize,
    answer: Answer,
    /// `None` once written (and in a spare line).
    shared: Option<Arc<Shared>>,
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
        self.0.answer = answer;
        self.end();
    }

    /// Counts bytes of the streamed body the line is waiting for.
    pub(crate) fn count(&mut self, bytes: usize) {
        let answer = &mut self.0.answer;
        answer.bytes_out = answer.bytes_out.saturating_add(bytes as u64);
    }

    /// Writes the line with the answer it holds.
    pub(crate) fn end(self) {
        let mut line = self.0;
        let Some(shared) = line.shared.take() else {
            return;
        };
        let answer = line.answer;
        let text = &line.text;
        let (head, tail) = text.split_at(line.split.min(text.len()));
        // The answer's fields are at most about 100 bytes.
        let len = text.len().saturating_add(128);
        shared.append(len, |out| {
            out.extend_from_slice(head);
            push_answer(shared.format, &answer, out);
            // A JSON line has nothing after the answer.
            if !tail.is_empty() {
                out.extend_from_slice(tail);
            }
        });
        give_back(line);
    }
}

/// What a line says of the answer, after its head: to the end of a JSON line, the status and
/// bytes of a combined one.
fn push_answer(format: Format, answer: &Answer, out: &mut Vec<u8>) {
    match format {
        Format::Json => {
            out.extend_from_slice(b",\"status\":");
            push_u64(out, u64::from(answer.status));
            match answer.code {
                Some(code) => {
                    out.extend_from_slice(b",\"code\":\"");
                    out.extend_from_slice(code.as_bytes());
                    out.extend_from_slice(b"\",\"upstream_us\":");
                }
                None => out.extend_from_slice(b",\"code\":null,\"upstream_us\":"),
            }
            match answer.upstream {
                Some(d) => {
                    push_u64(out, micros(d));
                    out.extend_from_slice(b",\"bytes_out\":");
                }
                None => out.extend_from_slice(b"null,\"bytes_out\":"),
            }
            push_u64(out, answer.bytes_out);
            out.extend_from_slice(b"}\n");
        }
        Format::Combined => {
            push_u64(out, u64::from(answer.status));
            out.push(b' ');
            push_u64(out, answer.bytes_out);
        }
    }
}

/// What a line says after the answer: a combined line's referrer and user agent.
fn push_tail(format: Format, head: &Head<'_>, out: &mut Vec<u8>) {
    if format == Format::Combined {
        out.extend_from_slice(b" \"-\" \"");
        match head.headers.get(http::header::USER_AGENT) {
            Some(ua) => escape_combined_bytes(out, ua),
            None => out.push(b'-'),
        }
        out.extend_from_slice(b"\"\n");
    }
}

/// The length of a body the gateway made itself; 0 for a streamed one.
fn own_body_len(body: &ResponseBody) -> u64 {
    match body {
        ResponseBody::Full(bytes) => bytes.as_ref().map_or(0, |b| b.len() as u64),
        ResponseBody::Upstream(_) => 0,
    }
}

/// `field` (`,"name":`) then `value` quoted, or `null`: for values that never need escaping
/// (key ids are hex digits, namespaces labels).
fn plain_or_null(out: &mut Vec<u8>, field: &[u8], value: Option<&[u8]>) {
    out.extend_from_slice(field);
    match value {
        Some(v) => {
            out.push(b'"');
            out.extend_from_slice(v);
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
}

fn write_loop(shared: &Shared, target: &Target, mut out: Box<dyn io::Write + Send>) {
    let mut taken: Vec<Vec<u8>> = Vec::new();
    let mut failing = false;
    loop {
        std::thread::park_timeout(FLUSH_EVERY);
        let closing = shared.closing.load(Ordering::Acquire);
        shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(&mut taken);
        if !taken.is_empty() {
            let written = taken
                .iter()
                .try_for_each(|block| out.write_all(block))
                .and_then(|()| out.flush());
            match written {
                Ok(()) => failing = false,
                Err(e) => {
                    // Lines of a block written before the failure are counted as lost too:
                    // a write that fails part way does not say how much it wrote.
                    let lost: usize = taken
                        .iter()
                        .map(|block| block.iter().filter(|&&b| b == b'\n').count())
                        .sum();
                    shared.dropped.fetch_add(lost as u64, Ordering::Relaxed);
                    if !failing {
                        tracing::warn!(error = %e, lines = lost, "the access log could not be written; lines are dropped until it can");
                    }
                    failing = true;
                }
            }
            shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .give_back(&mut taken);
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
    // A request has few headers: comparing their names (a standard one differs at once) costs
    // less than hashing this one to look it up.
    let value = if headers.len() <= 8 {
        headers
            .iter()
            .find(|(name, _)| **name == crate::headers::TRACEPARENT)
            .map(|(_, v)| v)
    } else {
        headers.get(crate::headers::TRACEPARENT)
    };
    let v = value?.to_str().ok()?;
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
    mut response: Response<ResponseBody>,
    line: Option<Pending>,
    code: Option<&'static str>,
    upstream: Option<Duration>,
) -> Response<ResponseBody> {
    let Some(mut line) = line else {
        return response;
    };
    let answer = Answer {
        status: response.status().as_u16(),
        code,
        upstream,
        bytes_out: 0,
    };
    // The line goes into the body where it is: nothing is moved.
    match response.body_mut() {
        ResponseBody::Upstream(body) if body.line.is_none() => {
            line.0.answer = answer;
            body.line = Some(line);
        }
        other => {
            // A body of the gateway's own is whole already; a streamed one with a line (never
            // made so) is counted by a line of its own.
            line.finish(Answer {
                bytes_out: own_body_len(other),
                ..answer
            });
        }
    }
    response
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

/// `00` to `99`, for writing numbers two digits at a time.
// Evaluated when the crate is built: an overflow or an index out of range fails the build.
#[allow(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]
const PAIRS: [[u8; 2]; 100] = {
    let mut t = [[0u8; 2]; 100];
    let mut i = 0;
    while i < 100 {
        t[i] = [b'0' + (i / 10) as u8, b'0' + (i % 10) as u8];
        i += 1;
    }
    t
};

/// Each octet's digits, then a dot, and how many digits: `(*b"7.\0\0", 1)`.
// Evaluated when the crate is built: an overflow or an index out of range fails the build.
#[allow(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]
const OCTETS: [([u8; 4], usize); 256] = {
    let mut t = [([0u8; 4], 0usize); 256];
    let mut i = 0;
    while i < 256 {
        let d = [
            b'0' + (i / 100) as u8,
            b'0' + (i / 10 % 10) as u8,
            b'0' + (i % 10) as u8,
        ];
        t[i] = if i >= 100 {
            ([d[0], d[1], d[2], b'.'], 3)
        } else if i >= 10 {
            ([d[1], d[2], b'.', 0], 2)
        } else {
            ([d[2], b'.', 0, 0], 1)
        };
        i += 1;
    }
    t
};

/// `n`'s two digits, for `n` below 100.
fn pair(n: u64) -> [u8; 2] {
    usize::try_from(n)
        .ok()
        .and_then(|i| PAIRS.get(i))
        .copied()
        .unwrap_or(*b"00")
}

/// Decimal digits, without the formatting machinery (this runs several times a line).
/// Numbers below 10,000, nearly all of a line's (statuses, sizes, most durations), are one
/// copy of a known size, inlined where they are written.
#[inline(always)]
pub(crate) fn push_u64(out: &mut Vec<u8>, n: u64) {
    if n < 10_000 {
        push_short(out, n);
    } else {
        push_long_u64(out, n);
    }
}

/// [`push_u64`] below 10,000: one copy of a known size.
#[inline(always)]
fn push_short(out: &mut Vec<u8>, n: u64) {
    if n < 10 {
        let [_, one] = pair(n);
        out.push(one);
    } else if n < 100 {
        out.extend_from_slice(&pair(n));
    } else {
        let [a, b] = pair(n / 100);
        let [c, d] = pair(n % 100);
        if n < 1_000 {
            out.extend_from_slice(&[b, c, d]);
        } else {
            out.extend_from_slice(&[a, b, c, d]);
        }
    }
}

/// [`push_u64`] of 10,000 and more. Below 10^8 (a day's quota, a body's size, most
/// durations in microseconds): the top digits as a short number, then four more. Past it,
/// two digits at a time into an array copied whole, then the unused end cut: a copy of a
/// known size costs a few moves, one of a varying size a call.
#[inline(never)]
fn push_long_u64(out: &mut Vec<u8>, mut n: u64) {
    if n < 100_000_000 {
        push_short(out, n / 10_000);
        let low = n % 10_000;
        let [a, b] = pair(low / 100);
        let [c, d] = pair(low % 100);
        out.extend_from_slice(&[a, b, c, d]);
        return;
    }
    let len = n.checked_ilog10().map_or(1, |l| l.saturating_add(1)) as usize;
    let mut digits = [0u8; 20];
    let mut put = |at: usize, two: [u8; 2]| {
        if let Some(d) = digits.get_mut(at..).and_then(|d| d.first_chunk_mut::<2>()) {
            *d = two;
        }
    };
    let mut end = len;
    while n >= 100 {
        end = end.saturating_sub(2);
        put(end, pair(n % 100));
        n /= 100;
    }
    if n >= 10 {
        put(0, pair(n));
    } else {
        let [_, one] = pair(n);
        if let Some(d) = digits.first_mut() {
            *d = one;
        }
    }
    let kept = out.len().saturating_add(len);
    out.extend_from_slice(&digits);
    out.truncate(kept);
}

/// The client's address: the connection's text when there is one, else formatted.
#[inline(always)]
fn push_client(out: &mut Vec<u8>, head: &Head<'_>) {
    match head.client_text {
        Some(text) => out.extend_from_slice(text),
        None => push_ip(out, head.client),
    }
}

pub(crate) fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            // Each octet's digits and a dot from a table, on the stack, then copied once
            // without the last dot.
            let mut text = [0u8; 16];
            let mut len = 0usize;
            for octet in v4.octets() {
                let (digits, n) = OCTETS.get(usize::from(octet)).copied().unwrap_or_default();
                if let Some(d) = text.get_mut(len..).and_then(|d| d.first_chunk_mut::<4>()) {
                    *d = digits;
                }
                len = len.saturating_add(n).saturating_add(1);
            }
            // Copied whole (a known size), then cut after the last digit.
            let kept = out.len().saturating_add(len.saturating_sub(1));
            out.extend_from_slice(&text);
            out.truncate(kept);
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

const LOW_BITS: u64 = 0x0101_0101_0101_0101;
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

/// Whether any of the eight bytes in `x` is below `n` (at most 0x80).
const fn any_below(x: u64, n: u8) -> bool {
    x.wrapping_sub(LOW_BITS.wrapping_mul(n as u64)) & !x & HIGH_BITS != 0
}

/// Whether any of the eight bytes in `x` is `b`.
const fn any_equal(x: u64, b: u8) -> bool {
    any_below(x ^ LOW_BITS.wrapping_mul(b as u64), 1)
}

/// Whether every byte of `bytes` passes `plain`, checked eight at a time by `chunk_plain`:
/// nearly every field needs no escaping, and this says so in a few steps a field.
fn all_plain(bytes: &[u8], chunk_plain: impl Fn(u64) -> bool, plain: impl Fn(u8) -> bool) -> bool {
    let chunks = bytes.chunks_exact(8);
    let tail = chunks.remainder();
    chunks
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .all(chunk_plain)
        && tail.iter().all(|&b| plain(b))
}

fn json_plain_byte(b: u8) -> bool {
    b >= 0x20 && b != 0x7f && b != b'"' && b != b'\\'
}

fn json_plain(text: &str) -> bool {
    all_plain(
        text.as_bytes(),
        |x| {
            !(any_below(x, 0x20) || any_equal(x, b'"') || any_equal(x, b'\\') || any_equal(x, 0x7f))
        },
        json_plain_byte,
    )
}

fn combined_plain_byte(b: u8) -> bool {
    (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\'
}

fn combined_plain(bytes: &[u8]) -> bool {
    all_plain(
        bytes,
        |x| {
            x & HIGH_BITS == 0
                && !(any_below(x, 0x20)
                    || any_equal(x, b'"')
                    || any_equal(x, b'\\')
                    || any_equal(x, 0x7f))
        },
        combined_plain_byte,
    )
}

/// JSON string content: quotes, backslashes and control characters escaped, the rest copied
/// in runs as it is (valid UTF-8 already), so a line is always valid JSON.
#[inline(always)]
pub(crate) fn escape_json(out: &mut Vec<u8>, text: &str) {
    if json_plain(text) {
        out.extend_from_slice(text.as_bytes());
    } else {
        escape_json_slowly(out, text);
    }
}

#[inline(never)]
fn escape_json_slowly(out: &mut Vec<u8>, text: &str) {
    let mut rest = text;
    while let Some(at) = rest.bytes().position(|b| !json_plain_byte(b)) {
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
    if combined_plain(text.as_bytes()) {
        out.extend_from_slice(text.as_bytes());
        return;
    }
    let escape = |out: &mut Vec<u8>, b: u8| {
        let _ = write!(out, "\\x{b:02X}");
    };
    let mut rest = text;
    while let Some(at) = rest.bytes().position(|b| !combined_plain_byte(b)) {
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
                if combined_plain_byte(b) {
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
#[derive(Debug, Clone, Copy)]
struct SecondText {
    second: u64,
    /// `2026-12-07T03:20:00`
    rfc3339: [u8; 19],
    /// `07/Dec/2026:03:20:00 +0000`
    common: [u8; 26],
}

thread_local! {
    static SECOND: Cell<Option<SecondText>> = const { Cell::new(None) };
}

fn second_text(second: u64) -> SecondText {
    if let Some(text) = SECOND
        .try_with(Cell::get)
        .ok()
        .flatten()
        .filter(|t| t.second == second)
    {
        return text;
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // `2026-12-07T03:20:00Z`, cut into the pieces both formats need.
    let whole = UNIX_EPOCH
        .checked_add(Duration::from_secs(second))
        .unwrap_or(UNIX_EPOCH);
    let iso = humantime::format_rfc3339_seconds(whole).to_string();
    let part = |from: usize, to: usize| iso.get(from..to).unwrap_or("00");
    let month = part(5, 7).parse::<usize>().unwrap_or(1);
    let name = MONTHS.get(month.saturating_sub(1)).unwrap_or(&"Jan");
    let common = format!(
        "{}/{name}/{}:{} +0000",
        part(8, 10),
        part(0, 4),
        part(11, 19)
    );
    // A wall clock past the year 9999 (the only way these are not of this length) writes
    // the epoch.
    let text = SecondText {
        second,
        rfc3339: iso
            .as_bytes()
            .get(..19)
            .and_then(|b| b.try_into().ok())
            .unwrap_or(*b"1970-01-01T00:00:00"),
        common: common
            .as_bytes()
            .try_into()
            .unwrap_or(*b"01/Jan/1970:00:00:00 +0000"),
    };
    let _ = SECOND.try_with(|cell| cell.set(Some(text)));
    text
}

thread_local! {
    /// A JSON line's opening up to its second, `{"time":"2026-12-07T03:20:00`, for the second
    /// this thread's last JSON line began in (`u64::MAX`, no second a clock gives, at first).
    static JSON_OPENING: Cell<(u64, [u8; 28])> = const { Cell::new((u64::MAX, [0; 28])) };
}

/// `{"time":"2026-12-07T03:20:00.123Z","request_id":"`: a JSON line's opening, in two copies
/// of known sizes, the first kept for the second.
fn json_time(out: &mut Vec<u8>, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let second = d.as_secs();
    let opening = match JSON_OPENING.try_with(Cell::get) {
        Ok((kept, opening)) if kept == second => opening,
        _ => {
            let mut opening = *b"{\"time\":\"1970-01-01T00:00:00";
            if let Some(date) = opening.get_mut(9..).and_then(|d| d.first_chunk_mut::<19>()) {
                *date = second_text(second).rfc3339;
            }
            let _ = JSON_OPENING.try_with(|cell| cell.set((second, opening)));
            opening
        }
    };
    out.extend_from_slice(&opening);
    // Below 1,000: three digits.
    let ms = u64::from(d.subsec_millis());
    let [_, hundreds] = pair(ms / 100);
    let [tens, ones] = pair(ms % 100);
    let mut rest = *b".000Z\",\"request_id\":\"";
    if let Some(digits) = rest.get_mut(1..).and_then(|d| d.first_chunk_mut::<3>()) {
        *digits = [hundreds, tens, ones];
    }
    out.extend_from_slice(&rest);
}

/// `2026-12-07T03:20:00.123Z`.
pub(crate) fn write_rfc3339_millis(out: &mut Vec<u8>, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let text = second_text(d.as_secs());
    out.extend_from_slice(&text.rfc3339);
    // Below 1,000: three digits.
    let ms = d.subsec_millis();
    // Each digit is below 10: the cast to a byte keeps it whole.
    #[allow(clippy::cast_possible_truncation)]
    let digit = |n: u32| b'0'.saturating_add((n % 10) as u8);
    out.extend_from_slice(&[b'.', digit(ms / 100), digit(ms / 10), digit(ms), b'Z']);
}

/// `07/Dec/2026:03:20:00 +0000`.
fn write_common_log_time(out: &mut Vec<u8>, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    out.extend_from_slice(&second_text(d.as_secs()).common);
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
    fn a_json_line_opens_with_its_time_whether_its_second_is_kept_or_not() {
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        // Twice the same second (kept), a later one, an earlier one, the epoch.
        for ms in [
            1_709_210_096_789,
            1_709_210_096_001,
            1_709_210_097_050,
            1_709_210_096_999,
            0,
            1_796_527_200_100,
        ] {
            let mut out = Vec::new();
            json_time(&mut out, at(ms));
            let expected = format!(
                "{{\"time\":\"{}\",\"request_id\":\"",
                humantime::format_rfc3339_millis(at(ms))
            );
            assert_eq!(text(&out), expected);
        }
    }

    #[test]
    fn a_refusal_written_whole_reads_as_one_begun_then_finished() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::USER_AGENT,
            HeaderValue::from_static("curl/8 \"x\""),
        );
        let request_id = HeaderValue::from_static("0123456789abcdef");
        let head = Head {
            time: UNIX_EPOCH + Duration::from_millis(1_796_527_200_123),
            request_id: &request_id,
            client: "203.0.113.9".parse().unwrap(),
            client_text: None,
            method: &Method::POST,
            path: "/v1/orders/\"7\"",
            query: Some("key=secret&page=2"),
            version: Version::HTTP_11,
            headers: &headers,
            bytes_in: Some(12),
            route: Some("orders"),
            key_id: Some(b"0a1b2c"),
            namespace: Some("acme"),
            identity: Some("cus_\u{e9}"),
            gateway: Duration::from_micros(41),
        };
        let mut response = Response::new(ResponseBody::full(bytes::Bytes::from_static(b"{}")));
        *response.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
        for format in [Format::Json, Format::Combined] {
            let dir = tempfile::tempdir().unwrap();
            let config = AccessLogConfig {
                path: "a.log".into(),
                format,
                sample: 1.0,
                query: true,
            };
            let log = AccessLog::open(&config, &dir.path().join("keygate.yaml")).unwrap();
            log.answered(&head, &response, "rate_limited");
            let begun = log.begin(&head, false).unwrap();
            let response = finish(
                Response::new(ResponseBody::full(bytes::Bytes::from_static(b"{}"))),
                Some(begun),
                Some("rate_limited"),
                None,
            );
            drop(response);
            log.close();
            let text = std::fs::read_to_string(dir.path().join("a.log")).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 2, "{text}");
            // The second line's status is the response's own (200): all else is the same.
            assert_eq!(lines[0].replacen("429", "200", 1), lines[1], "{format:?}");
            assert!(lines[0].contains("429") && lines[0].contains("REDACTED"));
            assert!(!lines[0].contains("secret"));
            if format == Format::Json {
                let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
                assert_eq!(v["code"], "rate_limited");
                assert_eq!(v["bytes_out"], 2);
                assert_eq!(v["identity"], "cus_\u{e9}");
            }
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

    fn append(shared: &Shared, line: &[u8]) {
        shared.append(line.len(), |out| out.extend_from_slice(line));
    }

    #[test]
    fn a_full_buffer_drops_lines_and_counts_them() {
        let shared = Shared::new(Format::Json);
        let line = [b'x'; 1000];
        // No writer takes the buffer: it fills, then every further line is dropped.
        for _ in 0..(MAX_PENDING / line.len() + 10) {
            append(&shared, &line);
        }
        let kept = shared.pending.lock().unwrap().bytes;
        assert_eq!(kept, MAX_PENDING / line.len() * line.len());
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 10);
        shared.closing.store(true, Ordering::Relaxed);
        append(&shared, b"late\n");
        assert_eq!(
            shared.dropped.load(Ordering::Relaxed),
            11,
            "nothing is taken once closed"
        );
    }

    /// Lines that fill several blocks come out whole and in order, and the writer's emptied
    /// blocks are reused rather than new ones made.
    #[test]
    fn lines_fill_blocks_in_order_and_blocks_are_reused() {
        let shared = Shared::new(Format::Json);
        let lines: Vec<String> = (0..3 * BLOCK / 50).map(|i| format!("{i:>48}\n")).collect();
        for line in &lines {
            append(&shared, line.as_bytes());
        }
        let mut taken = Vec::new();
        let mut queue = shared.pending.lock().unwrap();
        assert_eq!(queue.full.len(), 2, "two blocks sealed, the third open");
        assert!(queue.full.iter().all(|b| b.len() <= BLOCK));
        queue.take(&mut taken);
        assert_eq!(queue.bytes, 0);
        assert_eq!(taken.concat(), lines.concat().into_bytes());
        let used: Vec<*const u8> = taken.iter().map(|b| b.as_ptr()).collect();
        queue.give_back(&mut taken);
        assert_eq!(queue.spare.len(), 3);
        queue.seal();
        assert!(
            used.contains(&queue.open.as_ptr()),
            "an emptied block opened again"
        );
        // Blocks past the spares' number, or grown by a long line, are let go.
        let mut many: Vec<Vec<u8>> = (0..SPARE_BLOCKS)
            .map(|_| Vec::with_capacity(BLOCK))
            .collect();
        many.push(Vec::with_capacity(4 * BLOCK));
        queue.give_back(&mut many);
        assert_eq!(queue.spare.len(), SPARE_BLOCKS);
        assert!(queue
            .spare
            .iter()
            .all(|b| b.capacity() <= 2 * BLOCK && b.is_empty()));
    }

    /// A JSON access log writing `a.log` in a new temporary directory.
    fn json_log_in_temp_dir() -> (tempfile::TempDir, AccessLog) {
        let dir = tempfile::tempdir().unwrap();
        let config = AccessLogConfig {
            path: "a.log".into(),
            format: Format::Json,
            sample: 1.0,
            query: false,
        };
        let log = AccessLog::open(&config, &dir.path().join("keygate.yaml")).unwrap();
        (dir, log)
    }

    #[test]
    fn close_writes_every_line_appended_before_it() {
        let (dir, log) = json_log_in_temp_dir();
        for i in 0..1000 {
            append(&log.shared, format!("{i}\n").as_bytes());
        }
        log.close();
        let text = std::fs::read_to_string(dir.path().join("a.log")).unwrap();
        assert_eq!(text.lines().count(), 1000);
        assert_eq!(log.dropped(), 0);
    }

    #[test]
    fn close_writes_the_lines_of_every_thread_and_each_line_whole() {
        let (dir, log) = json_log_in_temp_dir();
        let log = Arc::new(log);
        // Each thread still alive (its per-thread state not torn down) when the log closes.
        let threads = 9;
        let written = Arc::new(std::sync::Barrier::new(threads + 1));
        let closed = Arc::new(std::sync::Barrier::new(threads + 1));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (log, written, closed) = (log.clone(), written.clone(), closed.clone());
                std::thread::spawn(move || {
                    for i in 0..500 {
                        append(
                            &log.shared,
                            format!("{t} {i} {}\n", "x".repeat(i % 90)).as_bytes(),
                        );
                    }
                    written.wait();
                    closed.wait();
                })
            })
            .collect();
        written.wait();
        log.close();
        closed.wait();
        for h in handles {
            h.join().unwrap();
        }
        let text = std::fs::read_to_string(dir.path().join("a.log")).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for line in text.lines() {
            let mut words = line.split(' ');
            let (t, i) = (words.next().unwrap(), words.next().unwrap());
            let i: usize = i.parse().unwrap();
            assert_eq!(words.next().unwrap(), "x".repeat(i % 90), "a whole line");
            assert!(seen.insert((t.to_string(), i)), "once");
        }
        assert_eq!(seen.len(), threads * 500);
        assert_eq!(log.dropped(), 0);
    }

    #[test]
    fn line_buffers_are_reused_and_long_ones_let_go() {
        let mut line = spare_line();
        line.text.extend_from_slice(b"a line");
        let at: *const Line = &*line;
        give_back(line);
        let mut again = spare_line();
        assert!(again.text.is_empty());
        assert!(std::ptr::eq(&*again, at), "the same line");
        again.text.resize(LINE_CAPACITY * 8, b'x');
        give_back(again);
        assert_eq!(spare_line().text.capacity(), LINE_CAPACITY, "a new one");
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
        let edges = (1..20).flat_map(|p| {
            let t = 10u64.pow(p);
            [
                t - 1,
                t,
                t + 1,
                t + 9_999,
                t.saturating_mul(9).saturating_add(10_001),
            ]
        });
        let spread = (0..2_000u64).map(|i| i * 49_999 + 100_000_000);
        for n in (0..100_000)
            .chain((0..200_000).map(|i| i * 499 + 100_000))
            .chain(edges)
            .chain(spread)
            .chain([99_999_999, 100_000_000, 12_345_678_901, u64::MAX])
        {
            let mut out = Vec::new();
            push_u64(&mut out, n);
            assert_eq!(text(&out), n.to_string());
        }
        for ip in [
            "10.0.0.255",
            "0.0.0.0",
            "192.168.100.9",
            "255.255.255.255",
            "1.22.203.4",
            "2001:db8::1",
        ] {
            let mut out = Vec::new();
            push_ip(&mut out, ip.parse().unwrap());
            assert_eq!(text(&out), ip);
        }
    }

    #[test]
    fn the_eight_byte_checks_agree_with_the_byte_checks() {
        // Every byte in every place of a chunk, among plain and non-ASCII neighbours.
        for b in 0..=255u8 {
            for at in 0..8 {
                for fill in [b'a', 0xc3, 0x80, 0xff, 0x21] {
                    let mut bytes = [fill; 8];
                    bytes[at] = b;
                    let json = bytes.iter().all(|&c| json_plain_byte(c));
                    let combined = bytes.iter().all(|&c| combined_plain_byte(c));
                    let x = u64::from_le_bytes(bytes);
                    let json_chunk = !(any_below(x, 0x20)
                        || any_equal(x, b'"')
                        || any_equal(x, b'\\')
                        || any_equal(x, 0x7f));
                    assert_eq!(json_chunk, json, "{bytes:?}");
                    assert_eq!(combined_plain(&bytes), combined, "{bytes:?}");
                    let mut longer = bytes.to_vec();
                    longer.extend_from_slice(b"abc");
                    assert_eq!(combined_plain(&longer), combined, "{longer:?}");
                }
            }
        }
        assert!(json_plain("/v1/items/é/42"));
        assert!(!json_plain("/v1/items/\"x"));
        assert!(!json_plain("/v1/items/12345\\"));
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
