//! Real nginx (Debian's, with `auth_request` and the headers-more module) and real Caddy
//! (Debian's 2.6, `forward_auth`) in front of a real upstream, each asking keygate's auth
//! listener, with the shipped configs in examples/ and only their addresses changed. The
//! proxy's request table runs through each: every refusal reaches the client with its true
//! status, code, body and Retry-After; accepted requests reach the upstream with the identity
//! headers and without the key; the client's own X-Keygate-* headers never do; and address
//! rules see the real client. The test command installs both; without them these tests say
//! so and fail, unless KEYGATE_SKIP_INGRESS is set.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::ingress::{check_refusal, fixture, free_port, Fixture};
use support::*;

/// A server the test started, stopped by its own PID when dropped.
struct Server {
    child: Child,
    name: &'static str,
    log: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Waits until `port` accepts connections, for at most 10 s.
    fn wait_listening(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}): {}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{} did not listen on {port} within 10 s", self.name);
    }
}

/// The example config with the example's addresses replaced by the test's.
fn example(path: &str, f: &Fixture, port: u16) -> String {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap();
    assert!(text.contains("127.0.0.1:9091") && text.contains("127.0.0.1:3000"));
    text.replace("127.0.0.1:9091", &f.auth.to_string())
        .replace("127.0.0.1:3000", &f.up.addr.to_string())
        .replace("listen 8000;", &format!("listen 127.0.0.1:{port};"))
        .replace(":8000 {", &format!("http://127.0.0.1:{port} {{"))
}

fn have(cmd: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found && std::env::var_os("KEYGATE_SKIP_INGRESS").is_none() {
        panic!("{cmd} is missing: the test command installs it (scripts/test.sh)");
    }
    found
}

const HEADERS_MORE: &str = "/usr/lib/nginx/modules/ngx_http_headers_more_filter_module.so";

fn start_nginx(f: &Fixture, dir: &Path) -> (Server, u16) {
    let port = free_port();
    let site = example("examples/nginx/keygate.conf", f, port);
    std::fs::write(dir.join("keygate.conf"), site).unwrap();
    let d = dir.display();
    let main = format!(
        "load_module {HEADERS_MORE};\ndaemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  include {d}/keygate.conf;\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
    let log = dir.join("error.log");
    let child = Command::new("nginx")
        .args(["-p", &d.to_string(), "-c", &format!("{d}/nginx.conf"), "-e"])
        .arg(&log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx starts");
    let mut server = Server {
        child,
        name: "nginx",
        log,
    };
    server.wait_listening(port);
    (server, port)
}

fn start_caddy(f: &Fixture, dir: &Path) -> (Server, u16) {
    let port = free_port();
    let site = example("examples/caddy/Caddyfile", f, port);
    // The test's own global options: no admin endpoint, nothing saved in a home folder.
    let file = format!("{{\n\tadmin off\n}}\n\n{site}");
    std::fs::write(dir.join("Caddyfile"), file).unwrap();
    let log = dir.join("caddy.log");
    let child = Command::new("caddy")
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(dir.join("Caddyfile"))
        .env("HOME", dir)
        .env("XDG_CONFIG_HOME", dir)
        .env("XDG_DATA_HOME", dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("caddy starts");
    let mut server = Server {
        child,
        name: "caddy",
        log,
    };
    server.wait_listening(port);
    (server, port)
}

/// The table through an ingress on `port`, from each case's client address.
async fn run_through(f: &Fixture, via: &str, port: u16) {
    let ingress: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    for case in &f.cases {
        let hits = f.up.hits();
        let mut req = Req::get(ingress, case.path)
            .method(case.method)
            .from(case.from)
            // A client's attempts to vouch for itself, in both spellings, and to change
            // the question asked.
            .header("x-keygate-key-id", "forged")
            .header("x-keygate-role", "admin")
            .header("x_keygate_namespace", "forged")
            .header("x-forwarded-uri", "/v1/public")
            .header("x-forwarded-method", "GET")
            .header("x-original-uri", "/v1/public");
        if let Some(a) = &case.authorization {
            req = req.header("authorization", a);
        }
        let r = send(req).await;
        check_refusal(case, &r, via);
        if case.status != 200 {
            assert_eq!(
                f.up.hits(),
                hits,
                "{via}: {} reached the upstream",
                case.what
            );
            continue;
        }
        assert_eq!(f.up.hits(), hits + 1, "{via}: {}", case.what);
        let seen = f.up.last();
        let h = |name: &str| {
            seen.headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(h("x-keygate-namespace"), ["acme"], "{via}: {}", case.what);
        assert_eq!(h("x-keygate-environment"), ["production"], "{via}");
        let id = h("x-keygate-key-id");
        assert!(id.len() == 1 && id[0] != "forged", "{via}: {id:?}");
        assert!(
            h("authorization").is_empty(),
            "{via}: the key went upstream"
        );
        for name in seen.headers.keys() {
            let n = name.as_str();
            assert!(
                !n.starts_with("x_keygate") && n != "x-keygate-role",
                "{via}: the client's {n} reached the upstream"
            );
        }
        assert_eq!(
            seen.path, case.path,
            "{via}: the upstream got the path asked about"
        );
    }
}

#[tokio::test]
async fn nginx_auth_request_gives_clients_keygates_true_answers() {
    if !have("nginx") {
        return;
    }
    assert!(
        Path::new(HEADERS_MORE).exists(),
        "the headers-more module is missing: the test command installs libnginx-mod-http-headers-more-filter"
    );
    let f = fixture("").await;
    let dir = tempfile::tempdir().unwrap();
    let (_nginx, port) = start_nginx(&f, dir.path());
    run_through(&f, "nginx", port).await;
    // The rate-limit headers reach the client on accepted requests too.
    let ingress: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let r = send(Req::get(ingress, "/v1/x").bearer(&f.good)).await;
    assert_eq!(r.status, 200);
    f.gw.stop().await;
}

#[tokio::test]
async fn caddy_forward_auth_gives_clients_keygates_true_answers() {
    if !have("caddy") {
        return;
    }
    let f = fixture("").await;
    let dir = tempfile::tempdir().unwrap();
    let (_caddy, port) = start_caddy(&f, dir.path());
    run_through(&f, "caddy", port).await;
    f.gw.stop().await;
}
