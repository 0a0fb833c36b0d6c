//! The one check of a key record. Every writer (the CLI, the admin API, an import) runs it on
//! each record it is about to store, and every snapshot build runs it on each record it
//! reads, so a record that a writer accepts always builds, and one written by hand or by an
//! older keygate is a located error, never an abort.
//!
//! The ranges it enforces are the documented ones (README, "Keys"): each bounds a value
//! that later becomes a timer, a limiter or a header, so that none can overflow there.

use super::{format, parse_sha256, validate_environment, validate_namespace, KeyRecord};
use crate::clock::{parse_rfc3339, LATEST};
use crate::config::units::parse_rate;
use crate::config::Config;
use crate::policy::net::CidrSet;
use crate::policy::quota::Quota;
use crate::policy::rate::RatePolicy;
use crate::policy::scope::Scope;

/// A key's name: at most this many characters, and no control characters.
pub const MAX_NAME_CHARS: usize = 200;
/// A key's note: at most this many characters; line breaks and tabs are its only control
/// characters.
pub const MAX_NOTE_CHARS: usize = 2000;
/// Scopes a key may carry.
pub const MAX_SCOPES: usize = 100;
/// Characters in one scope.
pub const MAX_SCOPE_CHARS: usize = 1024;
/// CIDRs a key may be limited to.
pub const MAX_CIDRS: usize = 100;
/// The largest burst: a million requests at once.
pub const MAX_BURST: u32 = 1_000_000;
/// Named rate limits a key may carry beside `rate_limit`.
pub const MAX_NAMED_LIMITS: usize = 10;
/// Characters in a named limit's name.
pub const MAX_LIMIT_NAME_CHARS: usize = 32;

/// One thing wrong with a record: the field (as the API and the store name it), the item of
/// a list field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: &'static str,
    pub index: Option<usize>,
    pub message: String,
}

impl Problem {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Problem {
            field,
            index: None,
            message: message.into(),
        }
    }

    /// The field's path under a record, such as `scopes[2]`.
    pub fn path(&self) -> String {
        match self.index {
            Some(i) => format!("{}[{i}]", self.field),
            None => self.field.to_string(),
        }
    }
}

/// What a valid record compiles to, for the request path.
#[derive(Debug, Clone)]
pub struct CheckedRecord {
    pub hash: [u8; 32],
    pub scopes: Vec<Scope>,
    pub allowed_cidrs: CidrSet,
    pub rate: Option<RatePolicy>,
    /// The named rate limits, in order.
    pub named: Vec<(String, RatePolicy)>,
    /// The key's own quota (a tier's is added by the snapshot).
    pub quota: Option<Quota>,
    /// Unix seconds.
    pub expires_at: Option<i64>,
    pub credits: Option<crate::policy::credits::Credits>,
}

/// The longest `leak_url` kept.
pub const MAX_LEAK_URL_CHARS: usize = 2_048;

/// The largest `meta`, as compact JSON.
pub const MAX_META_BYTES: usize = 4096;

/// Why `meta` cannot be kept, if it cannot: larger than [`MAX_META_BYTES`] as JSON.
pub fn meta_problem(meta: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    let size = serde_json::to_vec(meta).map_or(usize::MAX, |v| v.len());
    (size > MAX_META_BYTES).then(|| {
        format!("a JSON object of at most {MAX_META_BYTES} bytes as JSON; this one is {size}")
    })
}

/// Checks every field of `r` under `config`, reporting every problem at once.
pub fn check_record(r: &KeyRecord, config: &Config) -> Result<CheckedRecord, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut bad = |field, message: String| problems.push(Problem::new(field, message));
    if !is_key_id(&r.id) {
        bad(
            "id",
            format!("`{}` is not a key id (1 to 64 hex digits)", r.id),
        );
    }
    let hash = parse_sha256(&r.hash).map_err(|e| bad("hash", e)).ok();
    if !(format::valid_prefix(&r.prefix) || (r.imported && r.prefix.is_empty())) {
        bad(
            "prefix",
            format!("`{}` is not a valid key prefix", r.prefix),
        );
    }
    if let Err(e) = validate_namespace(&r.namespace) {
        bad("namespace", e);
    } else if config.strict && !config.namespaces.contains_key(&r.namespace) {
        bad(
            "namespace",
            format!(
                "`{}` is not declared in the config, which is strict",
                r.namespace
            ),
        );
    }
    if let Err(e) = validate_environment(&r.environment) {
        bad("environment", e);
    }
    for (field, text, max) in [
        ("name", &r.name, MAX_NAME_CHARS),
        ("created_by", &r.created_by, MAX_NAME_CHARS),
    ] {
        if let Err(e) = check_text(text, max, false) {
            bad(field, e);
        }
    }
    if let Err(e) = check_text(&r.note, MAX_NOTE_CHARS, true) {
        bad("note", e);
    }
    if let Some(e) = r.meta.as_ref().and_then(meta_problem) {
        bad("meta", e);
    }
    if let Some(Err(e)) = r.leaked_at.as_deref().map(parse_rfc3339) {
        bad("leaked_at", e);
    }
    if let Some(Err(e)) = r
        .leak_url
        .as_deref()
        .map(|u| check_text(u, MAX_LEAK_URL_CHARS, false))
    {
        bad("leak_url", e);
    }
    for (field, id) in [
        ("rotated_from", &r.rotated_from),
        ("rotated_to", &r.rotated_to),
    ] {
        if id.as_deref().is_some_and(|id| !is_key_id(id)) {
            bad(field, "must be a key id (1 to 64 hex digits)".into());
        }
    }
    if let Err(e) = parse_rfc3339(&r.created_at) {
        bad("created_at", e);
    }
    for (field, time) in [
        ("updated_at", &r.updated_at),
        ("revoked_at", &r.revoked_at),
        ("regenerated_at", &r.regenerated_at),
    ] {
        if let Some(Err(e)) = time.as_deref().map(parse_rfc3339) {
            bad(field, e);
        }
    }
    let expires_at = match r.expires_at.as_deref().map(parse_rfc3339) {
        None => None,
        Some(Ok(t)) if t <= LATEST => Some(t),
        Some(Ok(_)) => {
            bad(
                "expires_at",
                "must be no later than 9999-12-31T23:59:59Z".into(),
            );
            None
        }
        Some(Err(e)) => {
            bad("expires_at", e);
            None
        }
    };
    let rate = match check_rate(r.rate_limit.as_deref(), r.burst) {
        Ok(rate) => rate,
        Err(p) => {
            problems.push(p);
            None
        }
    };
    if let Some(e) = r.identity.as_deref().and_then(super::identity::id_problem) {
        problems.push(Problem::new("identity", e));
    }
    let named = match check_named_limits(&r.rate_limits) {
        Ok(named) => named,
        Err(p) => {
            problems.push(p);
            Vec::new()
        }
    };
    let quota = match r.quota.as_deref().map(Quota::parse) {
        None => None,
        Some(Ok(q)) => Some(q),
        Some(Err(e)) => {
            problems.push(Problem::new("quota", e));
            None
        }
    };
    if r.scopes.len() > MAX_SCOPES {
        problems.push(Problem::new(
            "scopes",
            format!("at most {MAX_SCOPES} scopes, not {}", r.scopes.len()),
        ));
    }
    let mut scopes = Vec::with_capacity(r.scopes.len());
    for (i, s) in r.scopes.iter().enumerate() {
        let parsed = if s.chars().count() > MAX_SCOPE_CHARS {
            Err(format!("a scope has at most {MAX_SCOPE_CHARS} characters"))
        } else {
            Scope::parse(s)
        };
        match parsed {
            Ok(s) => scopes.push(s),
            Err(message) => problems.push(Problem {
                field: "scopes",
                index: Some(i),
                message,
            }),
        }
    }
    if r.allowed_cidrs.len() > MAX_CIDRS {
        problems.push(Problem::new(
            "allowed_cidrs",
            format!("at most {MAX_CIDRS} CIDRs, not {}", r.allowed_cidrs.len()),
        ));
    }
    let allowed_cidrs = CidrSet::parse(&r.allowed_cidrs).unwrap_or_else(|errs| {
        problems.extend(errs.into_iter().map(|(i, message)| Problem {
            field: "allowed_cidrs",
            index: Some(i),
            message,
        }));
        CidrSet::default()
    });
    let credits = match r.credits.as_ref().map(check_credits).transpose() {
        Ok(c) => c,
        Err(p) => {
            problems.push(p);
            None
        }
    };
    match hash {
        Some(hash) if problems.is_empty() => Ok(CheckedRecord {
            hash,
            scopes,
            allowed_cidrs,
            rate,
            named,
            quota,
            expires_at,
            credits,
        }),
        _ => Err(problems),
    }
}

/// The credits a stored record holds: the balance up to [`MAX_CREDITS`], a refill of 1 to
/// [`MAX_CREDITS`] daily or monthly, and when it was set.
pub fn check_credits(c: &super::CreditsRecord) -> Result<crate::policy::credits::Credits, Problem> {
    use crate::policy::credits::{interval, Refill, MAX_CREDITS};
    if c.remaining > MAX_CREDITS {
        return Err(Problem::new(
            "credits",
            format!("remaining must be from 0 to {MAX_CREDITS}"),
        ));
    }
    let refill = match &c.refill {
        None => None,
        Some(r) => {
            if !(1..=MAX_CREDITS).contains(&r.amount) {
                return Err(Problem::new(
                    "credits",
                    format!("refill.amount must be from 1 to {MAX_CREDITS}"),
                ));
            }
            let interval = interval(&r.interval, r.day_of_month)
                .map_err(|e| Problem::new("credits", format!("refill: {e}")))?;
            Some(Refill {
                amount: r.amount,
                interval,
            })
        }
    };
    let set_at = match c.set_at.as_deref().map(parse_rfc3339) {
        None => 0,
        Some(Ok(t)) => t,
        Some(Err(e)) => return Err(Problem::new("credits", format!("set_at: {e}"))),
    };
    Ok(crate::policy::credits::Credits {
        remaining: c.remaining,
        set_at,
        version: c.version,
        refill,
    })
}

/// The rate policy a rate text and burst make: the burst defaults to the rate's N and
/// needs a rate.
pub fn check_rate(rate: Option<&str>, burst: Option<u32>) -> Result<Option<RatePolicy>, Problem> {
    let rate = rate
        .map(|r| parse_rate(r).map_err(|e| Problem::new("rate_limit", e)))
        .transpose()?;
    match (rate, burst) {
        (_, Some(b)) if !(1..=MAX_BURST).contains(&b) => Err(Problem::new(
            "burst",
            format!("must be from 1 to {MAX_BURST}"),
        )),
        (None, Some(_)) => Err(Problem::new("burst", "needs a rate limit as well")),
        (None, None) => Ok(None),
        (Some(rate), burst) => Ok(Some(RatePolicy {
            rate,
            burst: burst.unwrap_or(rate.count),
        })),
    }
}

/// The policies of a key's named rate limits, in order; the first problem names its item
/// (`rate_limits[1]`).
pub fn check_named_limits(
    limits: &[super::NamedLimitRecord],
) -> Result<Vec<(String, RatePolicy)>, Problem> {
    if limits.len() > MAX_NAMED_LIMITS {
        return Err(Problem::new(
            "rate_limits",
            format!(
                "at most {MAX_NAMED_LIMITS} named limits, not {}",
                limits.len()
            ),
        ));
    }
    let mut named: Vec<(String, RatePolicy)> = Vec::with_capacity(limits.len());
    for (i, l) in limits.iter().enumerate() {
        let problem = |message: String| Problem {
            field: "rate_limits",
            index: Some(i),
            message,
        };
        let valid_name = (1..=MAX_LIMIT_NAME_CHARS).contains(&l.name.len())
            && l.name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid_name {
            return Err(problem(format!(
                "`{}` is not a limit name: 1 to {MAX_LIMIT_NAME_CHARS} of a-z, 0-9, `_` and `-`",
                l.name.escape_debug()
            )));
        }
        if matches!(l.name.as_str(), "key" | "quota") {
            return Err(problem(format!(
                "`{}` names the short form's limit or the quota in the RateLimit headers: choose another name",
                l.name
            )));
        }
        if named.iter().any(|(n, _)| *n == l.name) {
            return Err(problem(format!("`{}` is named twice", l.name)));
        }
        let rate = parse_rate(&l.limit).map_err(&problem)?;
        let burst = l.burst.unwrap_or(rate.count);
        if !(1..=MAX_BURST).contains(&burst) {
            return Err(problem(format!("burst must be from 1 to {MAX_BURST}")));
        }
        named.push((l.name.clone(), RatePolicy { rate, burst }));
    }
    Ok(named)
}

/// A name or note: at most `max` characters, and no control characters but, where
/// `multiline`, line breaks and tabs. A control character could forge a row of a listing
/// or a line of a log.
pub fn check_text(text: &str, max: usize, multiline: bool) -> Result<(), String> {
    let allowed = |c: char| multiline && matches!(c, '\n' | '\t');
    if text.chars().count() > max {
        return Err(format!("must be at most {max} characters"));
    }
    if text
        .chars()
        .any(|c| (c.is_control() && !allowed(c)) || is_bidi_control(c))
    {
        return Err(if multiline {
            "must not hold control characters other than line breaks and tabs".into()
        } else {
            "must not hold control characters or line breaks".into()
        });
    }
    Ok(())
}

/// The Unicode bidirectional overrides and isolates, which make text display in another
/// order than it is stored.
pub(crate) fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// 1 to 64 hex digits.
pub fn is_key_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::tests::record;

    fn fields(r: &KeyRecord) -> Vec<String> {
        check_record(r, &Config::default())
            .err()
            .unwrap_or_default()
            .iter()
            .map(Problem::path)
            .collect()
    }

    #[test]
    fn a_plain_record_passes() {
        let checked = check_record(&record("ab12cd34"), &Config::default()).unwrap();
        assert!(checked.rate.is_none() && checked.expires_at.is_none());
    }

    #[test]
    fn every_problem_is_named_at_once() {
        let mut r = record("not-hex");
        r.rate_limit = Some("2000000000/s".into());
        r.expires_at = Some("10000-01-01T00:00:00Z".into());
        r.name = "two\nlines".into();
        r.scopes = vec!["read:/v1/**".into(), "fly:/x".into()];
        r.allowed_cidrs = vec!["10.0.0.0/33".into()];
        r.rotated_to = Some("x\ny".into());
        assert_eq!(
            fields(&r),
            [
                "id",
                "name",
                "rotated_to",
                "expires_at",
                "rate_limit",
                "scopes[1]",
                "allowed_cidrs[0]"
            ]
        );
    }

    #[test]
    fn limits_have_ranges() {
        let rate = |r: &str, b: Option<u32>| check_rate(Some(r), b).map_err(|p| p.field);
        assert_eq!(
            rate("1000000/s", Some(MAX_BURST)).unwrap().unwrap().burst,
            MAX_BURST
        );
        assert_eq!(rate("1000001/s", None).unwrap_err(), "rate_limit");
        assert_eq!(rate("10/s", Some(MAX_BURST + 1)).unwrap_err(), "burst");
        assert_eq!(rate("10/s", Some(0)).unwrap_err(), "burst");
        assert_eq!(check_rate(None, Some(5)).unwrap_err().field, "burst");
        assert_eq!(rate("7/m", None).unwrap().unwrap().burst, 7);
    }

    #[test]
    fn names_refuse_what_could_forge_a_line() {
        assert!(check_text("ci bot", 200, false).is_ok());
        assert!(check_text("a\nb", 200, false).is_err());
        assert!(check_text("a\rb", 2000, true).is_err());
        assert!(check_text("line one\nline two\tend", 2000, true).is_ok());
        assert!(check_text("evil\u{202E}txt", 200, false).is_err());
        assert!(check_text(&"é".repeat(200), 200, false).is_ok());
        assert!(check_text(&"é".repeat(201), 200, false).is_err());
    }
}
