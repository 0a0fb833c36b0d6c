//! Scopes: `<action>:<resource filter>`.
//!
//! Actions rank `read` < `write` < `admin` (= `*`): a scope grants its own action and every
//! lower one. A request needs `read` for GET, HEAD and OPTIONS, `write` for POST, PUT, PATCH
//! and DELETE, and `admin` for any other method. Filters are path patterns matched segment
//! by segment: `*` is exactly one non-empty segment, a final `**` is any remainder (including
//! none), and a bare `*` or `**` is every path.

use http::Method;

/// What a request asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Read,
    Write,
    Admin,
}

impl Action {
    pub fn required_for(method: &Method) -> Action {
        match *method {
            Method::GET | Method::HEAD | Method::OPTIONS => Action::Read,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE => Action::Write,
            _ => Action::Admin,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
}

/// One compiled scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    action: Action,
    segments: Vec<Segment>,
    /// Ends in `**`: any remainder matches.
    open: bool,
    /// The scope as written.
    text: Box<str>,
}

impl Scope {
    pub fn parse(text: &str) -> Result<Scope, String> {
        let (action, filter) = text.split_once(':').ok_or_else(|| {
            format!("`{text}` is not a scope: write <action>:<path pattern>, such as read:/v1/**")
        })?;
        let action = match action {
            "read" => Action::Read,
            "write" => Action::Write,
            "admin" | "*" => Action::Admin,
            other => {
                return Err(format!(
                    "`{other}` in `{text}` is not an action: use read, write, admin or *"
                ))
            }
        };
        if filter == "*" || filter == "**" {
            return Ok(Scope {
                action,
                segments: Vec::new(),
                open: true,
                text: text.into(),
            });
        }
        let rest = filter.strip_prefix('/').ok_or_else(|| {
            format!("the filter in `{text}` must be `*` or a path starting with `/`")
        })?;
        let parts: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        let mut open = false;
        let last = parts.len().saturating_sub(1);
        for (i, part) in parts.iter().enumerate() {
            match *part {
                "**" if i == last => open = true,
                "**" => return Err(format!("in `{text}`, `**` may only end the pattern")),
                "*" => segments.push(Segment::One),
                p if p.contains('*') => {
                    return Err(format!(
                        "in `{text}`, `*` must be a whole segment (`/v1/*/items`, not `/v1/a*`)"
                    ))
                }
                "." | ".." => {
                    return Err(format!("in `{text}`, `.` and `..` segments never match"))
                }
                p => segments.push(Segment::Literal(p.to_string())),
            }
        }
        Ok(Scope {
            action,
            segments,
            open,
            text: text.into(),
        })
    }

    /// The scope as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether this scope lets `action` reach `path` (normalised, without the query).
    pub fn allows(&self, action: Action, path: &str) -> bool {
        self.action >= action && self.matches(path)
    }

    fn matches(&self, path: &str) -> bool {
        let mut parts = path.strip_prefix('/').unwrap_or(path).split('/');
        for seg in &self.segments {
            match (seg, parts.next()) {
                (Segment::One, Some(p)) if !p.is_empty() => {}
                (Segment::Literal(lit), Some(p)) if lit == p => {}
                _ => return false,
            }
        }
        self.open || parts.next().is_none()
    }
}

/// A key's scopes. Empty means full access within its namespace and environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeSet(Vec<Scope>);

impl ScopeSet {
    pub fn new(scopes: Vec<Scope>) -> Self {
        ScopeSet(scopes)
    }

    pub fn allows(&self, method: &Method, path: &str) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let action = Action::required_for(method);
        self.0.iter().any(|s| s.allows(action, path))
    }

    /// The scopes as written.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(Scope::text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(scope: &str, method: Method, path: &str) -> bool {
        ScopeSet::new(vec![Scope::parse(scope).unwrap()]).allows(&method, path)
    }

    #[test]
    fn double_star_takes_any_remainder() {
        assert!(allows("read:/v1/**", Method::GET, "/v1/users/7/orders"));
        assert!(allows("read:/v1/**", Method::GET, "/v1"));
        assert!(allows("read:/v1/**", Method::GET, "/v1/"));
        assert!(!allows("read:/v1/**", Method::GET, "/v2/users"));
        assert!(!allows("read:/v1/**", Method::GET, "/v10"));
    }

    #[test]
    fn single_star_is_one_non_empty_segment() {
        assert!(allows("read:/v1/*/orders", Method::GET, "/v1/42/orders"));
        assert!(!allows("read:/v1/*/orders", Method::GET, "/v1//orders"));
        assert!(!allows(
            "read:/v1/*/orders",
            Method::GET,
            "/v1/42/43/orders"
        ));
        assert!(!allows("read:/v1/*", Method::GET, "/v1/"));
        assert!(!allows("read:/v1/users", Method::GET, "/v1/users/"));
    }

    #[test]
    fn bare_star_is_every_path() {
        assert!(allows("read:*", Method::GET, "/anything/at/all"));
        assert!(allows("write:**", Method::DELETE, "/"));
    }

    #[test]
    fn actions_are_ordered() {
        assert!(allows("write:*", Method::GET, "/x"));
        assert!(allows("write:*", Method::PATCH, "/x"));
        assert!(!allows("read:*", Method::POST, "/x"));
        assert!(!allows(
            "write:*",
            Method::from_bytes(b"PURGE").unwrap(),
            "/x"
        ));
        assert!(allows(
            "admin:*",
            Method::from_bytes(b"PURGE").unwrap(),
            "/x"
        ));
        assert!(allows("*:*", Method::TRACE, "/x"));
        assert!(allows("read:*", Method::HEAD, "/x") && allows("read:*", Method::OPTIONS, "/x"));
    }

    #[test]
    fn no_scopes_is_full_access() {
        assert!(ScopeSet::default().allows(&Method::DELETE, "/anything"));
    }

    #[test]
    fn any_scope_may_grant() {
        let set = ScopeSet::new(vec![
            Scope::parse("read:/v1/**").unwrap(),
            Scope::parse("write:/v1/uploads/*").unwrap(),
        ]);
        assert!(set.allows(&Method::POST, "/v1/uploads/a.png"));
        assert!(!set.allows(&Method::POST, "/v1/users"));
    }

    #[test]
    fn bad_scopes_say_why() {
        for (bad, says) in [
            ("read", "not a scope"),
            ("delete:/x", "not an action"),
            ("read:v1", "starting with `/`"),
            ("read:/v1/**/x", "may only end"),
            ("read:/v1/a*", "whole segment"),
            ("read:/v1/../x", "never match"),
        ] {
            let err = Scope::parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
