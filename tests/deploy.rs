//! The deployment files in deploy/: the systemd unit passes `systemd-analyze verify` (where
//! systemd is installed), the Kubernetes manifests parse and agree with each other, the
//! config in their ConfigMap passes `keygate check`, and the Dockerfile has the shape
//! README.md promises. No image is built and no cluster is run here.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

fn read(file: &str) -> String {
    std::fs::read_to_string(deploy(file)).unwrap()
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = read("keygate.service");
    for option in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DynamicUser=yes",
        "Type=notify",
        "WatchdogSec=",
    ] {
        assert!(unit.contains(option), "{option}");
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed: the unit's syntax is not verified here");
        return;
    }
    // The unit names the installed binary; verify checks that it exists, so point it at
    // the one under test.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/keygate", support::keygate_bin()),
    )
    .unwrap();
    // The optional socket unit beside it, verified with it.
    let socket = dir.path().join("keygate.socket");
    std::fs::write(&socket, read("keygate.socket")).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .arg(&socket)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    // Unknown or misspelt options are only warnings: there must be none.
    assert!(said.trim().is_empty(), "{said}");
}

fn documents(file: &str) -> Vec<serde_yaml::Value> {
    let text = read(&format!("kubernetes/{file}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn kinds(docs: &[serde_yaml::Value]) -> Vec<(String, String)> {
    docs.iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_string(),
                d["metadata"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn the_kubernetes_manifests_agree_and_their_config_checks() {
    let keygate = documents("keygate.yaml");
    let found = kinds(&keygate);
    for want in [
        "ConfigMap",
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
    ] {
        assert!(found.iter().any(|(k, _)| k == want), "{want} in {found:?}");
    }
    // The ingresses ask the Service's auth port, and Envoy under the config's prefix.
    let service = keygate.iter().find(|d| d["kind"] == "Service").unwrap();
    let auth_port = service["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "auth")
        .unwrap()["port"]
        .as_u64()
        .unwrap();
    let traefik = read("kubernetes/traefik.yaml");
    assert!(traefik.contains(&format!("keygate.default.svc:{auth_port}/")));
    let envoy = documents("envoy-gateway.yaml");
    let policy = envoy
        .iter()
        .find(|d| d["kind"] == "SecurityPolicy")
        .unwrap();
    let http = &policy["spec"]["extAuth"]["http"];
    assert_eq!(http["backendRefs"][0]["port"].as_u64(), Some(auth_port));
    assert_eq!(http["backendRefs"][0]["name"], "keygate");
    let config = keygate.iter().find(|d| d["kind"] == "ConfigMap").unwrap()["data"]["keygate.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(http["path"].as_str(), Some("/envoy"));
    assert!(config.contains("envoy_path_prefix: /envoy"));

    // The config itself, with its paths in a scratch folder and a real token hash.
    let dir = tempfile::tempdir().unwrap();
    let hash = keygate::keys::hex(&keygate::keys::format::hash("a token"));
    let config = config
        .replace("/var/lib/keygate", &dir.path().display().to_string())
        .replace("REPLACE_WITH_THE_SHA256_OF_YOUR_ADMIN_TOKEN", &hash);
    std::fs::write(dir.path().join("keygate.yaml"), config).unwrap();
    let (code, out, err) =
        support::process::run(&["check", "--config", "keygate.yaml"], dir.path());
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn the_dockerfile_builds_in_one_stage_and_runs_unprivileged_in_another() {
    let text = read("Dockerfile");
    let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert_eq!(stages, 2, "a build stage and a run stage");
    let user = text
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "{user}"
    );
    assert!(text.contains("VOLUME [\"/etc/keygate\", \"/var/lib/keygate\"]"));
    assert!(text.contains("COPY --from=build"));
}
