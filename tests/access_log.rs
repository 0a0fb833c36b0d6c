//! The access log of the real `keygate` binary: one JSON line per request with the right
//! fields, for an accepted request, each refusal and an upstream error; `traceparent` passed
//! through, or made when asked; `SIGUSR1` after a rename moves the writing to a new file and
//! loses no line; and the combined format. The suite's secret scan reads every file the
//! gateway wrote, the access logs among them.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::process::{create_key_json, keygate_ok, Process};
use support::*;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Every line of the access logs in `dir` (`access.log*`), parsed, oldest file first.
/// A gateway's directory with `routes` and `extra` as its config.
fn configured(routes: &str, extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(routes, extra),
    );
    dir
}

fn json_lines(dir: &Path) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("access.log")
        })
        .collect();
    // access.log.1 (renamed) holds the older lines.
    files.sort_by_key(|p| std::cmp::Reverse(p.to_string_lossy().len()));
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
                .collect::<Vec<Value>>()
        })
        .collect()
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_one_line_with_its_fields_and_sigusr1_reopens() {
    let up = Upstream::start().await;
    let closed = free_local_port();
    let routes = format!(
        "{}{}{}",
        route("/api", up.addr, "production", "name: api"),
        route("/big", up.addr, "production", "name: big"),
        route("/down", closed, "production", "name: down")
    );
    let extra = "access_log:\n  path: access.log\n  format: json\n  query: true\ntracing:\n  generate_traceparent: true\n";
    let dir = configured(&routes, extra);
    let good = create_key_json(dir.path(), &[]);
    let key = good["key"].as_str().unwrap().to_string();
    let key_id = good["id"].as_str().unwrap().to_string();
    let limited = create_key_json(dir.path(), &["--rate-limit", "1/h"]);
    let limited_key = limited["key"].as_str().unwrap().to_string();
    let revoked = create_key_json(dir.path(), &[]);
    keygate_ok(
        dir.path(),
        &["keys", "revoke", revoked["id"].as_str().unwrap()],
    );
    let revoked_key = revoked["key"].as_str().unwrap().to_string();

    let mut gw = Process::spawn(&["serve", "--config", "keygate.yaml"], dir.path(), &[]);
    let (proxy, admin_addr) = gw.addresses();

    // Each request, and the status and code its line must carry.
    let mut expected: Vec<(u16, Option<&str>)> = Vec::new();
    let r = send(Req::get(proxy, "/api/items?page=2&api_key=abc").bearer(&key)).await;
    assert_eq!(r.status, 200);
    expected.push((200, None));
    let made = up.last().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        made,
        format!(
            "00-{0}-{1}-00",
            r.header("x-request-id"),
            &r.header("x-request-id")[16..]
        ),
        "a request without a traceparent is given one, its trace id the request id"
    );
    let r = send(
        Req::get(proxy, "/api/traced")
            .bearer(&key)
            .header("traceparent", TRACEPARENT),
    )
    .await;
    assert_eq!(r.status, 200);
    expected.push((200, None));
    assert_eq!(
        up.last().headers["traceparent"],
        TRACEPARENT,
        "a valid traceparent reaches the upstream untouched"
    );
    let r = send(Req::get(proxy, "/big/100000").bearer(&key)).await;
    assert_eq!((r.status.as_u16(), r.body.len()), (200, 100_000));
    expected.push((200, None));
    for (req, status, code) in [
        (Req::get(proxy, "/api/x"), 401, "missing_key"),
        (
            Req::get(proxy, "/api/x").bearer("not-a-key"),
            401,
            "malformed_key",
        ),
        (Req::get(proxy, "/nowhere").bearer(&key), 404, "no_route"),
        (
            Req::get(proxy, "/api/x").bearer(&revoked_key),
            401,
            "revoked_key",
        ),
        (Req::get(proxy, "/api/x").bearer(&limited_key), 200, ""),
        (
            Req::get(proxy, "/api/x").bearer(&limited_key),
            429,
            "rate_limited",
        ),
        (
            Req::get(proxy, "/down/x").bearer(&key),
            502,
            "upstream_unavailable",
        ),
    ] {
        let r = send(req).await;
        assert_eq!(r.status, status, "{code}: {:?}", r.body);
        expected.push((status, (!code.is_empty()).then_some(code)));
    }
    // The unknown key: well-formed, with a valid checksum, never issued.
    let unknown = {
        let fresh = tempfile::tempdir().unwrap();
        write(
            &fresh.path().join("keygate.yaml"),
            &config_yaml(&routes, ""),
        );
        create_key_json(fresh.path(), &[])["key"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let r = send(Req::get(proxy, "/api/x").bearer(&unknown)).await;
    assert_eq!(r.status, 401);
    expected.push((401, Some("unknown_key")));

    wait_for("the first lines written", Duration::from_secs(5), || {
        dir.path().join("access.log").exists() && json_lines(dir.path()).len() == expected.len()
    });

    // logrotate's way: rename, then SIGUSR1; the writer opens a new access.log.
    std::fs::rename(
        dir.path().join("access.log"),
        dir.path().join("access.log.1"),
    )
    .unwrap();
    gw.signal("USR1");
    wait_for(
        "a new access.log after SIGUSR1",
        Duration::from_secs(5),
        || dir.path().join("access.log").exists(),
    );
    for i in 0..20 {
        let r = send(Req::get(proxy, &format!("/api/after/{i}")).bearer(&key)).await;
        assert_eq!(r.status, 200);
        expected.push((200, None));
    }
    assert_eq!(
        counter(admin_addr, "keygate_access_log_dropped_total").await,
        0
    );
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(15)), Some(0));

    let after = std::fs::read_to_string(dir.path().join("access.log")).unwrap();
    assert_eq!(
        after.lines().count(),
        20,
        "every line after the reopen is in the new file"
    );
    let lines = json_lines(dir.path());
    assert_eq!(
        lines.len(),
        expected.len(),
        "one line per request, none lost"
    );
    for (line, (status, code)) in lines.iter().zip(&expected) {
        assert_eq!(line["status"], *status, "{line}");
        assert_eq!(line["code"].as_str(), *code, "{line}");
        for field in ["time", "request_id", "client", "method", "path"] {
            assert!(line[field].is_string(), "{field} in {line}");
        }
        assert_eq!(line["client"], "127.0.0.1");
        assert!(line["gateway_us"].is_u64(), "{line}");
        assert!(!line["path"].as_str().unwrap().contains("abc"), "{line}");
    }
    let first = &lines[0];
    assert_eq!(
        first["path"], "/api/items?page=2&api_key=REDACTED",
        "{first}"
    );
    assert_eq!(first["route"], "api");
    assert_eq!(first["key_id"], key_id.as_str());
    assert_eq!(first["namespace"], "acme");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["bytes_in"], 0);
    assert!(first["upstream_us"].is_u64(), "{first}");
    assert_eq!(first["trace_id"].as_str().unwrap(), &made[3..35]);
    assert_eq!(lines[1]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        lines[2]["bytes_out"], 100_000,
        "a streamed body is counted whole"
    );
    let by_code: BTreeMap<&str, &Value> = lines
        .iter()
        .filter_map(|l| Some((l["code"].as_str()?, l)))
        .collect();
    assert_eq!(by_code["missing_key"]["key_id"], Value::Null);
    assert_eq!(by_code["no_route"]["route"], Value::Null);
    assert_eq!(by_code["revoked_key"]["key_id"], revoked["id"]);
    assert_eq!(by_code["rate_limited"]["key_id"], limited["id"]);
    assert_eq!(by_code["upstream_unavailable"]["route"], "down");
    assert!(by_code["upstream_unavailable"]["upstream_us"].is_u64());
    assert!(
        by_code["missing_key"]["bytes_out"].as_u64().unwrap() > 0,
        "the problem body is counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_combined_format_reads_as_nginx_writes_it_and_samples_accepted_requests() {
    let up = Upstream::start().await;
    let extra = "access_log:\n  path: access.log\n  format: combined\n  sample: 0.25\n";
    let dir = configured(&route("/", up.addr, "production", ""), extra);
    let good = create_key_json(dir.path(), &[]);
    let key = good["key"].as_str().unwrap();
    let mut gw = Process::spawn(&["serve", "--config", "keygate.yaml"], dir.path(), &[]);
    let (proxy, _) = gw.addresses();
    for i in 0..40 {
        let r = send(
            Req::get(proxy, &format!("/p/{i}?api_key=abc"))
                .bearer(key)
                .header("user-agent", "probe \"1\""),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    for _ in 0..3 {
        assert_eq!(send(Req::get(proxy, "/p")).await.status, 401);
    }
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(15)), Some(0));
    let text = std::fs::read_to_string(dir.path().join("access.log")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let accepted: Vec<&&str> = lines.iter().filter(|l| l.contains("\" 200 ")).collect();
    assert_eq!(
        accepted.len(),
        10,
        "a quarter of 40 accepted requests:\n{text}"
    );
    assert_eq!(lines.len(), 13, "every refusal is logged:\n{text}");
    let id = good["id"].as_str().unwrap();
    let first = accepted[0];
    assert!(
        first.starts_with(&format!("127.0.0.1 - {id} [")),
        "client, then the key id as the user: {first}"
    );
    assert!(first.contains("+0000] \"GET /p/"), "{first}");
    assert!(
        !first.contains("abc") && !first.contains('?'),
        "no query unless asked: {first}"
    );
    assert!(first.ends_with(" \"-\" \"probe \\x221\\x22\""), "{first}");
    let refused = lines.iter().find(|l| l.contains("\" 401 ")).unwrap();
    assert!(refused.starts_with("127.0.0.1 - - ["), "{refused}");
}

/// With two workers appending at once, every line reaches the file when the gateway drains,
/// the last ones still waiting for the writer when it stops. The request body's length is the
/// line's `bytes_in`, and unknown (`null`) for a chunked one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lines_of_every_worker_reach_the_file_at_the_drain() {
    let up = Upstream::start().await;
    let extra = "workers: 2\naccess_log:\n  path: access.log\n  format: json\n";
    let dir = configured(&route("/", up.addr, "production", ""), extra);
    let good = create_key_json(dir.path(), &[]);
    let key = good["key"].as_str().unwrap().to_string();
    let mut gw = Process::spawn(&["serve", "--config", "keygate.yaml"], dir.path(), &[]);
    let (proxy, _) = gw.addresses();
    // Sixteen clients at once, so that both workers answer.
    let clients: Vec<_> = (0..16)
        .map(|c| {
            let key = key.clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    let r = send(
                        Req::post(proxy, &format!("/c{c}/{i}"))
                            .bearer(&key)
                            .body("x".repeat(i)),
                    )
                    .await;
                    assert_eq!(r.status, 200);
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let chunked = send(
        Req::post(proxy, "/chunked")
            .bearer(&key)
            .header("transfer-encoding", "chunked")
            .body("hello"),
    )
    .await;
    assert_eq!(chunked.status, 200);
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(15)), Some(0));
    let lines = json_lines(dir.path());
    assert_eq!(lines.len(), 16 * 25 + 1, "one line per request");
    let mut paths = std::collections::BTreeSet::new();
    for line in &lines {
        let path = line["path"].as_str().unwrap();
        if path == "/chunked" {
            assert_eq!(line["bytes_in"], Value::Null, "chunked: {line}");
            continue;
        }
        assert!(paths.insert(path.to_string()), "once: {path}");
        let i: u64 = path.rsplit('/').next().unwrap().parse().unwrap();
        assert_eq!(line["bytes_in"], i, "{line}");
        assert_eq!(line["status"], 200);
    }
    assert_eq!(paths.len(), 16 * 25);
}

#[test]
fn a_bad_access_log_setting_is_a_located_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let routes = route("/", "127.0.0.1:9".parse().unwrap(), "production", "");
    let extra = "access_log:\n  path: access.log\n  sample: 1.5\n";
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(&routes, extra),
    );
    let (code, _, err) = support::process::run(&["check", "--config", "keygate.yaml"], dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("access_log.sample"), "{err}");
    assert!(err.contains("keygate.yaml:"), "located: {err}");
    let extra = "access_log:\n  path: no-such-dir/access.log\n";
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(&routes, extra),
    );
    let mut gw = Process::spawn(&["serve", "--config", "keygate.yaml"], dir.path(), &[]);
    assert_ne!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    let out = gw.output.lock().unwrap().join("\n");
    assert!(out.contains("cannot open the access log"), "{out}");
}

fn free_local_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}
