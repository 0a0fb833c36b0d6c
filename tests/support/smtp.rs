//! A real SMTP server on a free loopback port (`tests/support/smtp_server.py`, aiosmtpd),
//! with STARTTLS and AUTH required, under a CA made for the test. Stopped by its PID. The
//! README's test command installs aiosmtpd into `target/pytools` and names its Python in
//! `KEYGATE_TEST_PYTHON`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

pub const USER: &str = "alerts";

pub struct SmtpServer {
    pub port: u16,
    /// The CA the server's certificate is signed by, PEM, for `alerts.smtp.ca_file`.
    pub ca_pem: String,
    pub password: String,
    out: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("KEYGATE_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pytools/bin/python");
    if local.is_file() {
        return local;
    }
    panic!("aiosmtpd is not installed: run ./scripts/test.sh, or python3 -m venv target/pytools && target/pytools/bin/pip install aiosmtpd")
}

impl SmtpServer {
    pub fn start() -> SmtpServer {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "smtp test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        leaf.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let password = format!("pw-{port}-{}", std::process::id());
        let out = dir.path().join("mail");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/smtp_server.py");
        let mut child = Command::new(python())
            .arg(script)
            .arg(port.to_string())
            .arg(&cert_path)
            .arg(&key_path)
            .arg(&out)
            .arg(USER)
            .arg(&password)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the SMTP server starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the SMTP server says it is ready");
        SmtpServer {
            port,
            ca_pem: ca_cert.pem(),
            password,
            out,
            child,
            _dir: dir,
        }
    }

    /// The messages received so far: (envelope JSON, the message as sent).
    pub fn received(&self) -> Vec<(serde_json::Value, String)> {
        let mut all = Vec::new();
        for n in 1.. {
            let (meta, eml) = (
                self.out.join(format!("{n}.json")),
                self.out.join(format!("{n}.eml")),
            );
            let (Ok(meta), Ok(eml)) = (std::fs::read_to_string(meta), std::fs::read(eml)) else {
                break;
            };
            let Ok(meta) = serde_json::from_str(&meta) else {
                break;
            };
            all.push((meta, String::from_utf8_lossy(&eml).into_owned()));
        }
        all
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
