//! A real headless Chromium, driven through `chromedriver` and the W3C WebDriver protocol
//! (plain JSON over HTTP, so no client library is needed). `chromedriver` runs on a free
//! loopback port and is stopped by its PID; Chromium gets a fresh profile directory.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One browser session.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
}

/// An element found on the page.
#[derive(Debug, Clone)]
pub struct Element(String);

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

impl Browser {
    /// Starts chromedriver and a headless Chromium `width` pixels wide. Panics with the reason
    /// when either is missing: the README's test command installs both.
    pub async fn start(width: u32, height: u32) -> Browser {
        let driver_bin = find_program(&["chromedriver"])
            .expect("chromedriver is installed (apt-get install chromium-driver)");
        let chromium = std::env::var("KEYGATE_CHROMIUM")
            .map(PathBuf::from)
            .ok()
            .or_else(|| find_program(&["chromium", "chromium-browser", "google-chrome"]))
            .expect("chromium is installed (apt-get install chromium)");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = tempfile::tempdir().unwrap();
        let mut browser = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while call(&browser.base, "GET", "/status", None)
            .await
            .ok()
            .and_then(|v| v["value"]["ready"].as_bool())
            != Some(true)
        {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let args = [
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--hide-scrollbars".into(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            // The page sees exactly this viewport (a headless window has a minimum width).
            "goog:chromeOptions": {"binary": chromium, "args": args, "mobileEmulation": {
                "deviceMetrics": {"width": width, "height": height, "pixelRatio": 1.0},
            }},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let v = call(&browser.base, "POST", "/session", Some(caps))
            .await
            .expect("a browser session starts");
        browser.session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        browser
    }

    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        match call(&self.base, method, &path, body).await {
            Ok(v) => v["value"].clone(),
            Err(e) => panic!("webdriver {method} {path}: {e}"),
        }
    }

    pub async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url }))).await;
    }

    pub async fn refresh(&self) {
        self.cmd("POST", "/refresh", Some(json!({}))).await;
    }

    pub async fn url(&self) -> String {
        self.cmd("GET", "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub async fn resize(&self, width: u32, height: u32) {
        self.cmd(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    /// Every element matching a CSS selector now.
    pub async fn all(&self, css: &str) -> Vec<Element> {
        let v = self
            .cmd(
                "POST",
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[ELEMENT].as_str().map(|id| Element(id.to_string())))
            .collect()
    }

    /// The first element matching `css`, waiting up to 10 s for it to exist and be shown.
    pub async fn find(&self, css: &str) -> Element {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for e in self.all(css).await {
                if self.shown(&e).await {
                    return e;
                }
            }
            if Instant::now() >= deadline {
                let what = format!("no visible element matches {css:?} on {}", self.url().await);
                self.fail(&what).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn shown(&self, e: &Element) -> bool {
        self.cmd("GET", &format!("/element/{}/displayed", e.0), None)
            .await
            .as_bool()
            .unwrap_or(false)
    }

    pub async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd("POST", &format!("/element/{}/click", e.0), Some(json!({})))
            .await;
    }

    /// Clears a field, then types `text` into it.
    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd("POST", &format!("/element/{}/clear", e.0), Some(json!({})))
            .await;
        if !text.is_empty() {
            self.cmd(
                "POST",
                &format!("/element/{}/value", e.0),
                Some(json!({ "text": text })),
            )
            .await;
        }
    }

    /// Presses keys (WebDriver key codes, e.g. "\u{E00C}" for Escape) on the focused element.
    pub async fn press(&self, keys: &str) {
        let actions: Vec<Value> = keys
            .chars()
            .flat_map(|c| {
                [
                    json!({"type": "keyDown", "value": c.to_string()}),
                    json!({"type": "keyUp", "value": c.to_string()}),
                ]
            })
            .collect();
        self.cmd(
            "POST",
            "/actions",
            Some(json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]})),
        )
        .await;
    }

    pub async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.cmd("GET", &format!("/element/{}/text", e.0), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// A DOM property of the first element matching `css` (`value`, `checked`, `disabled`…).
    pub async fn property(&self, css: &str, name: &str) -> Value {
        let e = self.find(css).await;
        self.cmd("GET", &format!("/element/{}/property/{name}", e.0), None)
            .await
    }

    /// Runs a script in the page and returns its value.
    pub async fn eval(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// Runs a script that finishes by calling its last argument with its value, passing
    /// `args` before it; returns that value.
    pub async fn eval_async(&self, script: &str, args: Vec<Value>) -> Value {
        self.cmd(
            "POST",
            "/execute/async",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// A PNG screenshot of the first element matching `css`, as the page drew it, in base64.
    pub async fn element_screenshot(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.cmd("GET", &format!("/element/{}/screenshot", e.0), None)
            .await
            .as_str()
            .expect("a base64 screenshot")
            .to_string()
    }

    /// Waits up to 10 s for `script` to return true.
    pub async fn wait_until(&self, what: &str, script: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.eval(script).await != Value::Bool(true) {
            if Instant::now() >= deadline {
                self.fail(&format!("timed out waiting until {what}")).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The page's whole markup, as the DOM has it now.
    pub async fn source(&self) -> String {
        self.eval("return document.documentElement.outerHTML")
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Fails the test with `what`, saving what the page looked like for whoever reads it.
    async fn fail(&self, what: &str) -> ! {
        let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console/failure.png");
        self.screenshot(&shot).await;
        panic!("{what} (screenshot: {})", shot.display());
    }

    /// Writes a PNG screenshot of the viewport to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let b64 = self.cmd("GET", "/screenshot", None).await;
        let png = decode_base64(b64.as_str().expect("a base64 screenshot"));
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Messages the page logged to the console at level SEVERE (errors, CSP violations).
    pub async fn errors(&self) -> Vec<String> {
        let v = self
            .cmd("POST", "/se/log", Some(json!({"type": "browser"})))
            .await;
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == "SEVERE")
            .filter_map(|e| e["message"].as_str().map(String::from))
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session closes Chromium; then chromedriver is stopped by its PID.
        let (base, session) = (self.base.clone(), self.session.clone());
        if !session.is_empty() {
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(10),
                        call(&base, "DELETE", &format!("/session/{session}"), None),
                    )
                    .await;
                });
            })
            .join();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

async fn call(base: &str, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
    let client: Client<_, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .map_err(|_| "no answer within 30 s".to_string())?
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {v}"));
    }
    Ok(v)
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in text.bytes().filter_map(value) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
