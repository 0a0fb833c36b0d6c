//! The `keygate` command line as a user types it.

mod support;

use std::path::Path;

use support::process::{create_key_json, run};
use support::*;

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let routes = route("/", "127.0.0.1:9".parse().unwrap(), "production", "");
    write(
        &dir.path().join("keygate.yaml"),
        &config_yaml(&routes, "tiers:\n  pro: {max_keys: 10}\n  enterprise: {}\nnamespaces:\n  acme: {tier: enterprise}\n  globex: {prefix: globex}\nenvironments: [staging]"),
    );
    dir
}

fn keygate(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["--config", "keygate.yaml"];
    all.extend_from_slice(args);
    run(&all, dir)
}

#[test]
fn create_prints_the_secret_once_and_stores_only_its_hash() {
    let dir = setup();
    let v = create_key_json(
        dir.path(),
        &[
            "--scope",
            "read:/v1/**",
            "--allow-cidr",
            "10.0.0.0/8",
            "--rate-limit",
            "100/s",
            "--burst",
            "200",
            "--expires",
            "30d",
            "--name",
            "ci",
            "--note",
            "deploys",
        ],
    );
    let key = v["key"].as_str().unwrap();
    assert!(key.starts_with("kg_live_"), "{key}");
    keygate::keys::format::parse(key).expect("a well-formed key");
    let id = v["id"].as_str().unwrap();
    assert_eq!(id.len(), 8);
    assert_eq!(v["scopes"][0], "read:/v1/**");
    assert_eq!(v["allowed_cidrs"][0], "10.0.0.0/8");
    assert_eq!(v["rate_limit"], "100/s");
    assert_eq!(v["burst"], 200);
    assert_eq!(v["status"], "active");
    assert!(v["expires_at"].as_str().unwrap().ends_with('Z'));
    let store = std::fs::read_to_string(dir.path().join("keys.yaml")).unwrap();
    assert!(!store.contains(key), "the secret must never be stored");
    let hash = keygate::keys::hex(&keygate::keys::format::hash(key));
    assert!(store.contains(&format!("sha256:{hash}")));
    assert!(id == &hash[..8]);

    // show and list never print the secret.
    let (code, out, _) = keygate(dir.path(), &["keys", "show", id]);
    assert_eq!(code, 0);
    assert!(out.contains("read:/v1/**") && out.contains("100/s, burst 200") && !out.contains(key));
    let (_, out, _) = keygate(dir.path(), &["keys", "list"]);
    assert!(
        out.contains(id) && out.contains("kg_live") && out.contains("ci") && !out.contains(key)
    );
    // Human output of create says the secret is shown once.
    let (code, out, _) = keygate(
        dir.path(),
        &[
            "keys",
            "create",
            "--namespace",
            "globex",
            "--environment",
            "staging",
        ],
    );
    assert_eq!(code, 0);
    assert!(out.contains("globex_test_"), "{out}");
    assert!(out.contains("only time"), "{out}");
    // A typo names the environments that exist, on one line, and makes nothing.
    let (code, out, err) = keygate(
        dir.path(),
        &[
            "keys",
            "create",
            "--namespace",
            "acme",
            "--environment",
            "prodution",
        ],
    );
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("`prodution`") && err.contains("`production`, `staging`"),
        "{err}"
    );
}

#[test]
fn lifecycle_disable_enable_revoke() {
    let dir = setup();
    let id = create_key_json(dir.path(), &[])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let status = |filter: &str| {
        let (_, out, _) = keygate(dir.path(), &["keys", "list", "--status", filter, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(status("active"), vec![id.clone()]);
    assert_eq!(keygate(dir.path(), &["keys", "disable", &id]).0, 0);
    assert_eq!(status("inactive"), vec![id.clone()]);
    assert!(status("active").is_empty());
    assert_eq!(keygate(dir.path(), &["keys", "enable", &id]).0, 0);
    assert_eq!(status("active"), vec![id.clone()]);
    let (code, out, _) = keygate(dir.path(), &["keys", "revoke", &id]);
    assert_eq!(code, 0);
    assert!(out.contains("revoked"));
    assert_eq!(status("revoked"), vec![id.clone()]);
    assert!(status("all").contains(&id));
    let (_, out, _) = keygate(dir.path(), &["keys", "list", "--json"]);
    assert!(!out.contains(&id), "revoked keys leave the default list");
    let (code, _, err) = keygate(dir.path(), &["keys", "enable", &id]);
    assert_eq!(code, 1);
    assert!(err.contains("revoked") && err.lines().count() == 1, "{err}");
}

#[test]
fn bad_input_gets_one_line_naming_the_flag() {
    let dir = setup();
    for (args, says) in [
        (vec!["--allow-cidr", "10.0.0.0/33"], "--allow-cidr"),
        (vec!["--scope", "delete:/x"], "--scope"),
        (vec!["--rate-limit", "fast"], "--rate-limit"),
        (vec!["--burst", "5"], "--burst"),
        (vec!["--expires", "yesterday"], "--expires"),
        (vec!["--expires", "2001-01-01T00:00:00Z"], "--expires"),
    ] {
        let mut all = vec![
            "keys",
            "create",
            "--namespace",
            "acme",
            "--environment",
            "production",
        ];
        all.extend_from_slice(&args);
        let (code, out, err) = keygate(dir.path(), &all);
        assert_eq!(code, 1, "{args:?}");
        assert!(out.is_empty());
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("keygate: error: ") && err.contains(says),
            "{err}"
        );
    }
    let (code, _, err) = keygate(
        dir.path(),
        &[
            "keys",
            "create",
            "--namespace",
            "Bad Name",
            "--environment",
            "production",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("--namespace"), "{err}");
    let (code, _, err) = keygate(dir.path(), &["keys", "show", "ffffffff"]);
    assert_eq!(
        (code, err.trim()),
        (1, "keygate: error: no key has id `ffffffff`")
    );
    let (code, _, err) = keygate(dir.path(), &["keys", "frobnicate"]);
    assert_eq!(code, 1);
    assert!(!err.contains("panicked"));
    let (code, _, err) = run(&["--config", "missing.yaml", "keys", "list"], dir.path());
    assert_eq!(code, 1);
    assert!(err.contains("missing.yaml"), "{err}");
}

#[test]
fn config_flag_works_anywhere_and_from_the_environment() {
    let dir = setup();
    let (code, out, _) = run(&["check", "--config", "keygate.yaml"], dir.path());
    assert_eq!(code, 0, "{out}");
    let out = std::process::Command::new(keygate_bin())
        .args(["keys", "list"])
        .current_dir(dir.path())
        .env("KEYGATE_CONFIG", "keygate.yaml")
        .output()
        .unwrap();
    support::ledger::cli(&["keys", "list"], &out.stdout, &out.stderr);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_lists_every_error_and_exits_one() {
    let dir = setup();
    create_key_json(dir.path(), &[]);
    let (code, out, _) = keygate(dir.path(), &["check"]);
    assert_eq!(code, 0);
    assert!(out.contains("1 route, 1 key"), "{out}");
    let store_path = dir.path().join("keys.yaml");
    let store = std::fs::read_to_string(&store_path).unwrap();
    write(
        &store_path,
        &store.replace(
            "\"status\":\"active\"",
            "\"status\":\"active\",\"allowed_cidrs\":[\"nope\"],\"rate_limit\":\"9/fortnight\"",
        ),
    );
    let config = std::fs::read_to_string(dir.path().join("keygate.yaml")).unwrap();
    write(
        &dir.path().join("keygate.yaml"),
        &config.replace("environment: production", "environment: PROD"),
    );
    let (code, _, err) = keygate(dir.path(), &["check"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("keygate.yaml:") && err.contains("routes[0].environment"),
        "{err}"
    );
    assert!(
        err.contains("keys.yaml:5:") && err.contains("keys[0].allowed_cidrs[0]"),
        "{err}"
    );
    assert!(err.contains("keys[0].rate_limit"), "{err}");
    assert!(err.contains("3 problems found"), "{err}");
}

#[test]
fn concurrent_creates_all_survive() {
    let dir = setup();
    let path = dir.path().to_path_buf();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                (0..5)
                    .map(|_| {
                        create_key_json(&path, &[])["id"]
                            .as_str()
                            .unwrap()
                            .to_string()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut ids: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 40);
    let (_, out, _) = keygate(dir.path(), &["keys", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["keys"].as_array().unwrap().len(),
        40,
        "every acknowledged create is in the store"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "no temp files are left behind");
}

/// A store with every key state exported, loaded into an empty store and exported again:
/// the same bytes, and no secret in them. Loading again replaces, and a bad file changes
/// nothing.
#[test]
fn export_then_load_round_trips_every_key_state() {
    let from = setup();
    let secrets = every_key_state(&from.path().join("keygate.yaml"));
    let (code, exported, err) = keygate(from.path(), &["keys", "export"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(exported.lines().filter(|l| l.starts_with("- {")).count(), 8);
    for s in &secrets {
        assert!(!exported.contains(s.as_str()), "a secret in the export");
    }
    for state in ["\"inactive\"", "\"revoked\"", "rotated_to", "imported"] {
        assert!(exported.contains(state), "{state} missing from the export");
    }

    let to = setup();
    write(&to.path().join("backup.yaml"), &exported);
    let (code, out, err) = keygate(to.path(), &["keys", "load", "backup.yaml", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["added"].as_u64(), v["replaced"].as_u64()),
        (Some(8), Some(0))
    );
    let (_, again, _) = keygate(to.path(), &["keys", "export"]);
    assert_eq!(again, exported, "export → load → export changed the bytes");
    // The loaded store is a store: `check` accepts it, and the states hold.
    let (code, _, err) = keygate(to.path(), &["check"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = keygate(to.path(), &["keys", "load", "-"]);
    assert_ne!(code, 0, "standard input was empty: {out}");

    let (code, out, err) = keygate(to.path(), &["keys", "load", "backup.yaml"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("0 added, 8 replaced"), "{out}");
    assert_eq!(keygate(to.path(), &["keys", "export"]).1, exported);

    // A record that fails the record check, or a hash another key holds: refused, in one
    // line naming the record, and the store is unchanged.
    let first = exported.lines().find(|l| l.starts_with("- {")).unwrap();
    let record: serde_json::Value = serde_json::from_str(&first[2..]).unwrap();
    let edited = |change: &dyn Fn(&mut serde_json::Value)| {
        let mut r = record.clone();
        change(&mut r);
        format!("- {r}")
    };
    let bad_scope = exported.replacen(
        first,
        &edited(&|r| r["scopes"] = serde_json::json!(["nope"])),
        1,
    );
    let twin = edited(&|r| r["id"] = "abcdef12".into());
    let clash = format!("{exported}{twin}\n");
    for (name, text, says) in [
        ("scope.yaml", bad_scope, "keys[0]"),
        ("clash.yaml", clash, "has the hash of another key"),
    ] {
        write(&to.path().join(name), &text);
        let (code, out, err) = keygate(to.path(), &["keys", "load", name]);
        assert_eq!(code, 1, "{out}");
        assert!(
            err.contains(says) && err.trim().lines().count() == 1,
            "{err}"
        );
        assert_eq!(keygate(to.path(), &["keys", "export"]).1, exported);
    }
    // Not a store at all: the file and line are named.
    write(&to.path().join("junk.yaml"), "keys: [this is not\n");
    let (code, _, err) = keygate(to.path(), &["keys", "load", "junk.yaml"]);
    assert_eq!(code, 1);
    assert!(err.contains("junk.yaml:"), "{err}");
}

/// `keygate init`: a commented config in front of the given upstream, an empty SQLite store
/// and one admin token printed once (only its hash written); `check` passes, `serve` answers
/// the token on the admin API and a new key through the proxy; a second `init` writes
/// nothing and says why in one line.
#[test]
fn init_writes_a_working_gateway_and_never_overwrites() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(Upstream::start());
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("gw");
    let upstream = format!("http://{}", up.addr);
    let (code, out, err) = run(
        &[
            "init",
            "--dir",
            dir.to_str().unwrap(),
            "--upstream",
            &upstream,
        ],
        parent.path(),
    );
    assert_eq!(code, 0, "{err}");
    let token = out
        .split_whitespace()
        .find(|w| w.starts_with("kga_"))
        .expect("the token is printed")
        .to_string();
    support::ledger::secret(&token);
    assert!(out.contains("keys create --namespace default"), "{out}");
    let config = std::fs::read_to_string(dir.join("keygate.yaml")).unwrap();
    assert!(!config.contains(&token), "only the token's hash is written");
    assert!(config.contains(&keygate::keys::hex(&keygate::keys::format::hash(&token))));
    assert!(dir.join("keys.db").exists());
    let config_path = dir.join("keygate.yaml");
    let config_arg = config_path.to_str().unwrap();
    let (code, out, _) = run(&["--config", config_arg, "check"], parent.path());
    assert_eq!(code, 0);
    assert!(out.contains("ok (1 route, 0 keys"), "{out}");

    // The fixed ports of a real install, moved to free ones for the test.
    write(
        &config_path,
        &config
            .replace("127.0.0.1:8080", "127.0.0.1:0")
            .replace("127.0.0.1:9090", "127.0.0.1:0"),
    );
    let key = create_key_json(&dir, &[]);
    let secret = key["key"].as_str().unwrap().to_string();
    let gw = support::process::Process::spawn(&["--config", "keygate.yaml", "serve"], &dir, &[]);
    let (proxy, admin) = gw.addresses();
    rt.block_on(async {
        let listed = send(Req::get(admin, "/v1/api-keys").bearer(&token)).await;
        assert_eq!(listed.status, 200, "the printed token is an admin token");
        assert_eq!(listed.json()["keys"].as_array().map(Vec::len), Some(1));
        assert_eq!(
            send(Req::get(proxy, "/v1/x").bearer(&secret)).await.status,
            200
        );
    });
    drop(gw);

    let before = std::fs::read(&config_path).unwrap();
    let (code, out, err) = run(&["init", "--dir", dir.to_str().unwrap()], parent.path());
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("never overwrites"), "{err}");
    assert_eq!(std::fs::read(&config_path).unwrap(), before);
    let (code, _, err) = run(
        &["init", "--dir", "elsewhere", "--upstream", "ftp://x"],
        parent.path(),
    );
    assert_eq!(code, 1);
    assert!(err.starts_with("keygate: error: --upstream: "), "{err}");
    assert!(
        !parent.path().join("elsewhere").exists(),
        "a refused init writes nothing"
    );
}

#[test]
fn completions_and_the_manual_page_come_from_the_same_definitions() {
    let dir = tempfile::tempdir().unwrap();
    let (code, bash, err) = run(&["completions", "bash"], dir.path());
    assert_eq!(code, 0, "{err}");
    for word in ["keygate", "identities", "rotate", "--rate-limit"] {
        assert!(bash.contains(word), "the bash script knows {word}");
    }
    let script = dir.path().join("keygate.bash");
    std::fs::write(&script, &bash).unwrap();
    let syntax = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .status()
        .unwrap();
    assert!(syntax.success(), "bash reads the script");
    for shell in ["zsh", "fish"] {
        let (code, out, err) = run(&["completions", shell], dir.path());
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("identities"), "{shell}");
    }
    let (code, _, err) = run(&["completions", "tcsh"], dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("tcsh"), "{err}");
    let (code, man, err) = run(&["man"], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(
        man.starts_with(".ie") || man.contains(".TH keygate"),
        "roff: {}",
        &man[..80.min(man.len())]
    );
    assert!(man.contains("completions") && man.contains("identities"));
}
