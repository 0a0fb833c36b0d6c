//! Running the real `keygate` binary as a child process, stopped by its own PID.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `keygate` process. Dropping it kills the process by its PID, and gives what it
/// printed and the files in its folder to the secret ledger.
pub struct Process {
    pub child: Child,
    /// Every line, stdout and stderr as they came.
    pub output: Arc<Mutex<Vec<String>>>,
    /// Stdout's lines and stderr's (the log), apart.
    streams: [Arc<Mutex<Vec<String>>>; 2],
    readers: Vec<std::thread::JoinHandle<()>>,
    args: Vec<String>,
    dir: std::path::PathBuf,
}

impl Process {
    /// Starts `keygate ARGS…` with stdout and stderr collected line by line.
    pub fn spawn(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Process {
        let mut cmd = Command::new(super::keygate_bin());
        cmd.args(args);
        Self::start(cmd, args, dir, env)
    }

    /// Starts `keygate ARGS…` as [`Process::spawn`] does, but with a soft open-file limit of
    /// `soft` (the hard limit unchanged), as systemd starts services by default (1024). The
    /// shell lowers the limit and then `exec`s keygate, so the PID is keygate's own.
    pub fn spawn_with_open_file_limit(
        soft: u64,
        args: &[&str],
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Process {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("ulimit -Sn {soft} && exec \"$0\" \"$@\""))
            .arg(super::keygate_bin())
            .args(args);
        Self::start(cmd, args, dir, env)
    }

    /// Starts `keygate ARGS…` as systemd's socket activation does: `listener` handed over as
    /// fd 3, named `proxy` (`LISTEN_FDS=1`, `LISTEN_FDNAMES=proxy`, `LISTEN_PID` its own PID),
    /// while the caller keeps its own copy, so that the socket outlives the process as it
    /// outlives a service's restarts. A shell moves the socket from its stdin to fd 3, then
    /// becomes keygate, so the PID is keygate's own.
    pub fn spawn_with_socket(
        listener: &std::net::TcpListener,
        args: &[&str],
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Process {
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg("exec 3<&0 0</dev/null; export LISTEN_FDS=1 LISTEN_FDNAMES=proxy LISTEN_PID=$$; exec \"$0\" \"$@\"")
            .arg(super::keygate_bin())
            .args(args);
        let socket =
            std::os::fd::OwnedFd::from(listener.try_clone().expect("a copy of the socket"));
        Self::start_with_stdin(cmd, args, dir, env, Stdio::from(socket))
    }

    fn start(cmd: Command, args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Process {
        Self::start_with_stdin(cmd, args, dir, env, Stdio::null())
    }

    fn start_with_stdin(
        mut cmd: Command,
        args: &[&str],
        dir: &Path,
        env: &[(&str, &str)],
        stdin: Stdio,
    ) -> Process {
        cmd.current_dir(dir)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.env_remove("KEYGATE_CONFIG")
            .env_remove("KEYGATE_ADMIN_TOKEN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("keygate starts");
        let output = Arc::new(Mutex::new(Vec::new()));
        let streams: [Arc<Mutex<Vec<String>>>; 2] = Default::default();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let readers = [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err),
        ]
        .into_iter()
        .zip(&streams)
        .map(|(stream, own)| {
            let (sink, own) = (output.clone(), own.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    own.lock().unwrap().push(line.clone());
                    sink.lock().unwrap().push(line);
                }
            })
        })
        .collect();
        Process {
            child,
            output,
            streams,
            readers,
            args: args.iter().map(|a| a.to_string()).collect(),
            dir: dir.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) for a line containing `needle`, and returns it.
    pub fn wait_for_line(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self
                .output
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no line with {needle:?} within {limit:?}: {:?}",
                self.output.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The proxy and admin addresses from the "keygate listening" log line.
    pub fn addresses(&self) -> (SocketAddr, SocketAddr) {
        let line = self.wait_for_line("keygate listening", Duration::from_secs(20));
        let field = |name: &str| -> SocketAddr {
            log_field(&line, name)
                .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
                .parse()
                .unwrap()
        };
        (field("proxy"), field("admin"))
    }

    /// The soft limit on open files this process has now, from `/proc/PID/limits`.
    pub fn open_file_limit(&self) -> u64 {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid())).unwrap();
        limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no open-file limit in /proc/{}/limits", self.pid()))
    }

    /// How many file descriptors this process holds open now.
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// How many sockets this process holds open now (listeners and connections).
    pub fn open_sockets(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .filter(|target| target.to_string_lossy().starts_with("socket:"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Sends a signal to this process's PID.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {}", self.pid());
    }

    /// Waits (bounded) for the process to exit and returns its status code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The pipes close with the process; wait (bounded) for the
                // readers to take its last lines, so callers see all of them.
                while !self.readers.iter().all(|r| r.is_finished()) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "keygate {} did not exit within {limit:?}",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A field of /proc/PID/status, in kB (VmRSS, VmHWM).
    pub fn memory_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{field} not in /proc/{}/status", self.pid()))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // The pipes are closed now, so the readers finish with the last lines.
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let [stdout, stderr] = &self.streams;
        super::ledger::process(&args, &stdout.lock().unwrap(), &stderr.lock().unwrap());
        super::ledger::files(&format!("keygate {}", args.join(" ")), &self.dir);
    }
}

/// The value of `name=value` in a log line, up to the next space.
pub fn log_field<'l>(line: &'l str, name: &str) -> Option<&'l str> {
    let key = format!(" {name}=");
    let start = line.find(&key)? + key.len();
    line[start..].split_whitespace().next()
}

/// Runs `keygate ARGS…` to completion: exit code, stdout, stderr.
pub fn run(args: &[&str], dir: &Path) -> (i32, String, String) {
    let out = Command::new(super::keygate_bin())
        .args(args)
        .current_dir(dir)
        .env_remove("KEYGATE_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("keygate runs");
    super::ledger::cli(args, &out.stdout, &out.stderr);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `keygate --config keygate.yaml ARGS…` in `dir`, asserting success; returns stdout.
pub fn keygate_ok(dir: &Path, args: &[&str]) -> String {
    let mut all = vec!["--config", "keygate.yaml"];
    all.extend_from_slice(args);
    let (code, out, err) = run(&all, dir);
    assert_eq!(code, 0, "keygate {args:?}: {err}");
    out
}

/// `keys create --namespace acme --environment production --json EXTRA…`, parsed.
pub fn create_key_json(dir: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "keys",
        "create",
        "--namespace",
        "acme",
        "--environment",
        "production",
        "--json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&keygate_ok(dir, &args)).expect("create --json prints JSON")
}
