//! The command line: `serve`, `demo`, `check` and `keys …`. Every user error ends in one line
//! on stderr that names what is wrong, and exit status 1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::clock::Clock;
use crate::config::{Config, ConfigError};
use crate::keys::{self, KeyError, KeyRecord, NewKey, Status, Store};
use crate::pipeline::rate_limit::Limiters;
use crate::snapshot::{BuildContext, Snapshot};

/// How long SIGTERM waits for in-flight requests before closing connections.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// keygate: an API-key gateway.
#[derive(Debug, Parser)]
#[command(name = "keygate", version, about, propagate_version = true)]
pub struct Cli {
    /// The config file.
    #[arg(
        long,
        global = true,
        env = "KEYGATE_CONFIG",
        default_value = "config/keygate.yaml"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve,
    /// Run a self-contained demo: echo upstream, one fresh key, proxy on :8080, admin on :9090.
    Demo(DemoArgs),
    /// Validate the config and the key store; exit 1 listing every error.
    Check,
    /// Manage the key store the config names.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Proxy listener address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub proxy: String,
    /// Admin listener address.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub admin: String,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print its secret, once.
    Create(CreateArgs),
    /// List keys (all but revoked ones unless --status says otherwise).
    List {
        #[arg(long, value_enum)]
        status: Option<StatusFilter>,
        #[arg(long)]
        json: bool,
    },
    /// Show one key.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key, permanently: its clients get 401 revoked_key from the next request.
    Revoke { id: String },
    /// Disable a key for now: its clients get 401 inactive_key until it is enabled.
    Disable { id: String },
    /// Enable a disabled key.
    Enable { id: String },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    #[arg(long)]
    pub namespace: String,
    #[arg(long)]
    pub environment: String,
    #[arg(long, default_value = "")]
    pub name: String,
    /// `<action>:<path pattern>`, such as `read:/v1/**`; repeatable. None: full access.
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// CIDR or address the key may be used from; repeatable. None: anywhere.
    #[arg(long = "allow-cidr")]
    pub allow_cidrs: Vec<String>,
    /// `N/s`, `N/m` or `N/h`.
    #[arg(long)]
    pub rate_limit: Option<String>,
    /// Requests allowed at once (default: the rate's N).
    #[arg(long)]
    pub burst: Option<u32>,
    /// RFC 3339 time, or a duration from now such as `30d`.
    #[arg(long)]
    pub expires: Option<String>,
    #[arg(long, default_value = "")]
    pub note: String,
    /// Print the key and its record as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusFilter {
    Active,
    Inactive,
    Expired,
    Revoked,
    All,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve => serve(&cli.config),
        Command::Demo(args) => crate::demo::run(&args.proxy, &args.admin),
        Command::Check => check(&cli.config),
        Command::Keys(cmd) => run_keys(&cli.config, cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("keygate: error: {message}");
            ExitCode::from(1)
        }
    }
}

fn config_errors(errors: &[ConfigError]) -> String {
    match errors {
        [one] => one.to_string(),
        many => {
            let lines: Vec<String> = many.iter().map(|e| format!("  {e}")).collect();
            format!("{} problems:\n{}", many.len(), lines.join("\n"))
        }
    }
}

/// A tokio runtime with `workers` threads; one worker gets the lighter single-thread runtime.
pub fn runtime(workers: usize) -> Result<tokio::runtime::Runtime, String> {
    let built = match workers {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    built.map_err(|e| format!("cannot start the runtime: {e}"))
}

fn serve(config_path: &Path) -> Result<(), String> {
    let config = Config::load(config_path).map_err(|e| config_errors(&e))?;
    runtime(config.workers)?.block_on(async {
        let gateway = crate::server::Gateway::new(config_path, Clock::real())
            .map_err(|e| config_errors(&e))?;
        let running = crate::server::start(gateway, true)
            .await
            .map_err(|e| e.to_string())?;
        running
            .run_until_signal(DRAIN_TIMEOUT)
            .await
            .map_err(|e| e.to_string())
    })
}

fn check(config_path: &Path) -> Result<(), String> {
    let limiters = Limiters::new(Clock::real());
    let ctx = BuildContext {
        config_path,
        generation: 0,
        limiters: &limiters,
        previous: None,
        env_admin_token: None,
    };
    // Building a snapshot makes an upstream pool, which needs a runtime's context.
    let rt = runtime(1)?;
    let _guard = rt.enter();
    match Snapshot::load(&ctx) {
        Ok(s) => {
            println!(
                "{}: ok ({} routes, {} keys in {})",
                config_path.display(),
                s.routes.len(),
                s.key_count(),
                s.keys_path.display()
            );
            Ok(())
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            Err(format!(
                "{} problem{} found",
                errors.len(),
                if errors.len() == 1 { "" } else { "s" }
            ))
        }
    }
}

fn run_keys(config_path: &Path, cmd: KeysCommand) -> Result<(), String> {
    let config = Config::load(config_path).map_err(|e| config_errors(&e))?;
    let store = Store::new(config.keys_path(config_path));
    let now = Clock::real().unix_secs();
    match cmd {
        KeysCommand::Create(args) => {
            let json = args.json;
            let new = NewKey {
                namespace: args.namespace,
                environment: args.environment,
                name: args.name,
                scopes: args.scopes,
                allowed_cidrs: args.allow_cidrs,
                rate_limit: args.rate_limit,
                burst: args.burst,
                expires: args.expires,
                note: args.note,
            };
            let (record, secret) = keys::create(&store, &config, new, now).map_err(flag_error)?;
            if json {
                let mut view = record.view(now);
                view["key"] = serde_json::Value::String(secret);
                println!(
                    "{}",
                    serde_json::to_string_pretty(&view).unwrap_or_default()
                );
            } else {
                println!(
                    "Created key {} ({}/{}).",
                    record.id, record.namespace, record.environment
                );
                println!(
                    "This is the only time the secret is shown; only its SHA-256 is stored:\n"
                );
                println!("  {secret}\n");
            }
            Ok(())
        }
        KeysCommand::List { status, json } => {
            let (file, _) = store.load().map_err(|e| config_errors(&e))?;
            let keys: Vec<&KeyRecord> = file
                .keys
                .iter()
                .filter(|r| matches_filter(r.effective_status(now), status))
                .collect();
            if json {
                let views: Vec<_> = keys.iter().map(|r| r.view(now)).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"keys": views}))
                        .unwrap_or_default()
                );
            } else {
                print_table(&keys, now);
            }
            Ok(())
        }
        KeysCommand::Show { id, json } => {
            let (file, _) = store.load().map_err(|e| config_errors(&e))?;
            let record = file
                .keys
                .iter()
                .find(|r| r.id == id)
                .ok_or_else(|| KeyError::NotFound(id).to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&record.view(now)).unwrap_or_default()
                );
            } else {
                print_record(record, now);
            }
            Ok(())
        }
        KeysCommand::Revoke { id } => change_status(&store, &id, Status::Revoked, "revoked"),
        KeysCommand::Disable { id } => change_status(&store, &id, Status::Inactive, "disabled"),
        KeysCommand::Enable { id } => change_status(&store, &id, Status::Active, "enabled"),
    }
}

fn change_status(store: &Store, id: &str, status: Status, done: &str) -> Result<(), String> {
    let record = keys::set_status(store, id, status).map_err(flag_error)?;
    println!(
        "Key {} ({}/{}) {done}.",
        record.id, record.namespace, record.environment
    );
    Ok(())
}

/// Names the command-line flag behind a field error.
fn flag_error(e: KeyError) -> String {
    match e {
        KeyError::Invalid { field, message } => {
            let flag = match field {
                "scopes" => "--scope",
                "allowed_cidrs" => "--allow-cidr",
                "rate_limit" => "--rate-limit",
                "expires_at" => "--expires",
                "namespace" => "--namespace",
                "environment" => "--environment",
                "burst" => "--burst",
                "name" => "--name",
                "note" => "--note",
                other => other,
            };
            format!("{flag}: {message}")
        }
        other => other.to_string(),
    }
}

fn matches_filter(status: &str, filter: Option<StatusFilter>) -> bool {
    match filter {
        None => status != "revoked",
        Some(StatusFilter::All) => true,
        Some(StatusFilter::Active) => status == "active",
        Some(StatusFilter::Inactive) => status == "inactive",
        Some(StatusFilter::Expired) => status == "expired",
        Some(StatusFilter::Revoked) => status == "revoked",
    }
}

fn print_table(keys: &[&KeyRecord], now: i64) {
    if keys.is_empty() {
        println!(
            "No keys. Create one with `keygate keys create --namespace NS --environment ENV`."
        );
        return;
    }
    let rows: Vec<[String; 7]> = keys
        .iter()
        .map(|r| {
            [
                r.id.clone(),
                r.prefix.clone(),
                if r.name.is_empty() {
                    "-".into()
                } else {
                    r.name.clone()
                },
                format!("{}/{}", r.namespace, r.environment),
                r.effective_status(now).to_string(),
                r.expires_at.clone().unwrap_or_else(|| "never".into()),
                r.created_at.clone(),
            ]
        })
        .collect();
    let header = [
        "ID",
        "PREFIX",
        "NAME",
        "NAMESPACE/ENV",
        "STATUS",
        "EXPIRES",
        "CREATED",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 7]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header);
    for row in &rows {
        line(row.each_ref().map(String::as_str));
    }
}

fn print_record(r: &KeyRecord, now: i64) {
    let or = |v: &str, d: &str| {
        if v.is_empty() {
            d.to_string()
        } else {
            v.to_string()
        }
    };
    println!("id:            {}", r.id);
    println!("name:          {}", or(&r.name, "-"));
    println!("prefix:        {}", r.prefix);
    println!("namespace:     {}", r.namespace);
    println!("environment:   {}", r.environment);
    println!("status:        {}", r.effective_status(now));
    println!(
        "scopes:        {}",
        if r.scopes.is_empty() {
            "(full access)".into()
        } else {
            r.scopes.join(", ")
        }
    );
    println!(
        "allowed CIDRs: {}",
        if r.allowed_cidrs.is_empty() {
            "(any address)".into()
        } else {
            r.allowed_cidrs.join(", ")
        }
    );
    let rate = match (&r.rate_limit, r.burst) {
        (Some(rate), Some(b)) => format!("{rate}, burst {b}"),
        (Some(rate), None) => rate.clone(),
        _ => "(none)".into(),
    };
    println!("rate limit:    {rate}");
    println!(
        "expires:       {}",
        r.expires_at.as_deref().unwrap_or("never")
    );
    println!("created:       {}", r.created_at);
    println!("note:          {}", or(&r.note, "-"));
}
