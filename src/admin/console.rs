//! The API Keys console: a page served from the admin listener at `/` and `/console`, built
//! into the binary (gateways run in closed networks: no CDN). It calls only the admin API,
//! with the admin token the user signs in with, so serving it needs no token.

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use http::{HeaderName, Response};

use crate::body::ResponseBody;

/// Scripts and styles from this origin only, no inline code, and API calls to this origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const INDEX: &str = include_str!("console/index.html");

/// `(path, content type, body)` for every asset.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "/console/console.js",
        "text/javascript; charset=utf-8",
        include_str!("console/console.js"),
    ),
    (
        "/console/console.css",
        "text/css; charset=utf-8",
        include_str!("console/console.css"),
    ),
    (
        "/console/icon.svg",
        "image/svg+xml",
        include_str!("console/icon.svg"),
    ),
];

/// The console's answer for a `GET` of `path`, if the path is the console's.
pub fn serve(path: &str) -> Option<Response<ResponseBody>> {
    let (content_type, body) = match path {
        "/" | "/console" | "/console/" => ("text/html; charset=utf-8", INDEX),
        _ => ASSETS
            .iter()
            .find(|(p, _, _)| *p == path)
            .map(|&(_, t, b)| (t, b))?,
    };
    let mut response = Response::new(ResponseBody::full(Bytes::from_static(body.as_bytes())));
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static(CSP),
    );
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        HeaderName::from_static("x-frame-options"),
        HeaderValue::from_static("DENY"),
    );
    // The page changes with the binary; revalidating costs little on an admin listener.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_its_assets_are_served_with_a_strict_policy() {
        for path in [
            "/",
            "/console",
            "/console/console.js",
            "/console/console.css",
        ] {
            let r = serve(path).unwrap_or_else(|| panic!("{path} is served"));
            let csp = r.headers()["content-security-policy"].to_str().unwrap();
            assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"));
        }
        assert!(serve("/console/missing.js").is_none());
        assert!(serve("/v1/api-keys").is_none());
    }

    #[test]
    fn the_page_has_no_inline_script_or_style_and_no_remote_asset() {
        let inline_script = INDEX.split("<script").skip(1).any(|tag| {
            !tag.trim_start()
                .starts_with("type=\"module\" src=\"/console/")
        });
        assert!(!inline_script, "every script is a module from /console/");
        assert!(!INDEX.contains("<style") && !INDEX.contains(" style="));
        let handler = INDEX.match_indices(" on").any(|(at, _)| {
            let rest = &INDEX[at + 3..];
            let name_len = rest.bytes().take_while(u8::is_ascii_lowercase).count();
            name_len > 0 && rest[name_len..].starts_with('=')
        });
        assert!(!handler, "no inline event handlers");
        for (_, _, body) in ASSETS.iter().chain([&("", "", INDEX)]) {
            assert!(!body.contains("http://") || body.contains("http://www.w3.org/2000/svg"));
            assert!(!body.contains("https://"), "no remote assets");
        }
    }
}
