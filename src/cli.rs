//! The command line: `serve`, `demo`, `check`, `init`, `keys …`, `identities …` and
//! `tokens …`. Every user error ends in one line on stderr that names what is wrong, and
//! exit status 1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::audit::AuditEvent;
use crate::clock::Clock;
use crate::config::{Config, ConfigError};
use crate::keys::lifecycle::Op;
use crate::keys::{self, KeyError, KeyPatch, KeyRecord, NewKey, Side, Status, Store};
use crate::snapshot::{BuildContext, Snapshot};
use crate::state::limiters::Limiters;
use crate::state::usage::UsageBook;
use crate::state::usage::UsageReport;

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
    /// Write a working config in front of one upstream, an empty key store and one admin
    /// token (printed once, stored hashed); never overwrites.
    Init(InitArgs),
    /// Manage the key store the config names.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manage identities: customers whose limits, quota, credits and metadata every key
    /// naming them shares.
    #[command(subcommand)]
    Identities(IdentitiesCommand),
    /// Print a shell completion script to standard output, from the same definitions as
    /// the commands: `keygate completions bash > /etc/bash_completion.d/keygate`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to standard output: `keygate man > keygate.1`.
    Man,
    /// Manage the admin tokens kept in the store, beside those in the config.
    #[command(subcommand)]
    Tokens(TokensCommand),
}

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Make an admin token and print it, once; only its SHA-256 is stored.
    Create {
        /// 1 to 64 of a-z, 0-9, `_`, `.` and `-`: the actor in the audit log.
        #[arg(long)]
        name: String,
        /// `admin` (everything), `read` (the GET routes) or `verify` (`POST /v1/keys/verify`).
        #[arg(long)]
        role: String,
        /// RFC 3339, or a duration from now such as `30d`; the token is refused from then.
        #[arg(long)]
        expires: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List every admin token (the config's and the store's), with its last use.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke an admin token kept in the store: refused from its next call.
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
pub enum IdentitiesCommand {
    /// Make an identity, or replace it whole (as `PUT /v1/identities/{id}`).
    Put(Box<IdentityArgs>),
    /// List every identity.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one identity, with what its credits have left.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete an identity: its keys keep the name (still forwarded) and lose its limits.
    Delete { id: String },
}

#[derive(Debug, Args)]
pub struct IdentityArgs {
    /// The operator's own customer id: 1 to 255 bytes, no control characters.
    pub id: String,
    /// A rate limit every key of the identity spends, `NAME=N/s|N/m|N/h[:BURST]`;
    /// repeatable.
    #[arg(long = "limit", value_name = "NAME=RATE[:BURST]")]
    pub limits: Vec<String>,
    /// `N/day` or `N/month`, counted over all the identity's keys.
    #[arg(long)]
    pub quota: Option<String>,
    /// Credits every key of the identity spends from, 0 to 10^12.
    #[arg(long)]
    pub credits: Option<u64>,
    /// With --credits: the refill, `N/day`, `N/month` or `N/month@DAY`.
    #[arg(long, requires = "credits")]
    pub refill: Option<String>,
    /// A member of the identity's metadata, `NAME=VALUE`; repeatable.
    #[arg(long = "meta", value_name = "NAME=VALUE")]
    pub meta: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The API to put keygate in front of.
    #[arg(long, default_value = crate::init::DEFAULT_UPSTREAM)]
    pub upstream: String,
    /// Where to write keygate.yaml and keys.db (made if missing).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
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
    Create(Box<CreateArgs>),
    /// List keys (all but revoked ones unless --status says otherwise).
    List {
        #[arg(long, value_enum)]
        status: Option<StatusFilter>,
        #[arg(long)]
        json: bool,
    },
    /// Show one key, with its last use.
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
    /// Give a key a new secret (printed once); the old secret stops working at once.
    Regenerate {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Make a new key with the same settings; the old one keeps working for the grace.
    Rotate {
        id: String,
        /// How long the old key keeps working, such as `24h` (default: rotation.default_grace).
        #[arg(long)]
        grace: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Change a key's name, scopes, addresses, limits, expiry or note.
    Update(Box<UpdateArgs>),
    /// Top up a limited-use key's credits (--add) or set them anew (--set).
    Credits {
        id: String,
        /// Credits to add to what is left.
        #[arg(long, conflicts_with = "set", required_unless_present = "set")]
        add: Option<u64>,
        /// The balance, from now.
        #[arg(long)]
        set: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Report leaked keys: each that keygate issued is marked leaked and revoked (or
    /// --action), audited and sent to the alert webhook; other tokens change nothing.
    Leaked {
        /// One key per line, or the JSON of gitleaks or TruffleHog; `-` for standard input.
        file: PathBuf,
        /// `revoke` (the default), `disable`, or `report` (only mark and tell).
        #[arg(long, default_value = "revoke")]
        action: String,
        /// Where the keys were found (a URL or the scanner's name), kept on each key.
        #[arg(long, default_value = "")]
        source: String,
        #[arg(long)]
        json: bool,
    },
    /// Print the whole store in the file store's format (hashes only, every field and
    /// state): a backup, or the way to move to another store kind.
    Export,
    /// Read a file that `keys export` wrote into the configured store, whatever its kind:
    /// each record replaces the one with its id or is added; other keys are kept.
    Load {
        /// The file to read; `-` for standard input.
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Import existing plaintext keys (one per line, or CSV key,name,scopes); only their
    /// hashes are stored.
    Import {
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        environment: String,
        /// The file to read; `-` for standard input.
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
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
    /// `N/s`, `N/m` or `N/h`, N from 1 to 1000000.
    #[arg(long)]
    pub rate_limit: Option<String>,
    /// Requests allowed at once, 1 to 1000000 (default: the rate's N).
    #[arg(long, allow_negative_numbers = true)]
    pub burst: Option<u32>,
    /// A named rate limit beside --rate-limit, `NAME=N/s|N/m|N/h[:BURST]`; repeatable. All
    /// of a key's limits are spent together or not at all.
    #[arg(long = "limit", value_name = "NAME=RATE[:BURST]")]
    pub limits: Vec<String>,
    /// The customer the key belongs to (an identity id, up to 255 bytes): the identity's
    /// limits, quota and credits apply too.
    #[arg(long)]
    pub identity: Option<String>,
    /// `N/day` or `N/month` (default: the tier's quota, if any).
    #[arg(long)]
    pub quota: Option<String>,
    /// RFC 3339 time, or a duration from now such as `30d`.
    #[arg(long)]
    pub expires: Option<String>,
    #[arg(long, default_value = "")]
    pub note: String,
    /// A member of the key's metadata, `NAME=VALUE` (the value as text); repeatable.
    #[arg(long = "meta", value_name = "NAME=VALUE")]
    pub meta: Vec<String>,
    /// A limited-use key: this many credits, 0 to 10^12.
    #[arg(long)]
    pub credits: Option<u64>,
    /// The credits come back to N on the calendar: `N/day` (00:00 UTC) or `N/month`
    /// (the 1st, or `N/month@15` for the 15th). Needs --credits.
    #[arg(long, requires = "credits")]
    pub refill: Option<String>,
    /// Print the key and its record as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    pub id: String,
    #[arg(long)]
    pub name: Option<String>,
    /// Replaces the scopes; repeatable.
    #[arg(long = "scope", conflicts_with = "clear_scopes")]
    pub scopes: Vec<String>,
    /// Full access again: no scopes.
    #[arg(long)]
    pub clear_scopes: bool,
    /// Replaces the allowed CIDRs; repeatable.
    #[arg(long = "allow-cidr", conflicts_with = "clear_cidrs")]
    pub allow_cidrs: Vec<String>,
    /// Any address again.
    #[arg(long)]
    pub clear_cidrs: bool,
    /// `N/s`, `N/m` or `N/h`, N from 1 to 1000000.
    #[arg(long, conflicts_with = "clear_rate_limit")]
    pub rate_limit: Option<String>,
    /// Requests allowed at once, 1 to 1000000.
    #[arg(long, allow_negative_numbers = true)]
    pub burst: Option<u32>,
    /// No per-key rate limit.
    #[arg(long)]
    pub clear_rate_limit: bool,
    /// Replaces the named rate limits, `NAME=N/s|N/m|N/h[:BURST]`; repeatable.
    #[arg(
        long = "limit",
        value_name = "NAME=RATE[:BURST]",
        conflicts_with = "clear_limits"
    )]
    pub limits: Vec<String>,
    /// No named rate limits.
    #[arg(long)]
    pub clear_limits: bool,
    /// Moves the key to this identity.
    #[arg(long, conflicts_with = "clear_identity")]
    pub identity: Option<String>,
    /// Takes the key out of its identity.
    #[arg(long)]
    pub clear_identity: bool,
    /// `N/day` or `N/month`.
    #[arg(long, conflicts_with = "clear_quota")]
    pub quota: Option<String>,
    /// Back to the tier's quota, if any.
    #[arg(long)]
    pub clear_quota: bool,
    /// RFC 3339, a duration from now, or `never`.
    #[arg(long)]
    pub expires: Option<String>,
    #[arg(long)]
    pub note: Option<String>,
    /// Replaces the metadata with these members, `NAME=VALUE`; repeatable.
    #[arg(
        long = "meta",
        value_name = "NAME=VALUE",
        conflicts_with = "clear_meta"
    )]
    pub meta: Vec<String>,
    /// No metadata.
    #[arg(long)]
    pub clear_meta: bool,
    /// Sets the key's credits anew, from now; 0 to 10^12.
    #[arg(long, conflicts_with = "clear_credits")]
    pub credits: Option<u64>,
    /// With --credits: the refill, `N/day`, `N/month` or `N/month@DAY`.
    #[arg(long, requires = "credits")]
    pub refill: Option<String>,
    /// An unlimited key again: no credits.
    #[arg(long)]
    pub clear_credits: bool,
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
        Command::Init(args) => crate::init::run(&args.dir, &args.upstream),
        Command::Keys(cmd) => run_keys(&cli.config, cmd),
        Command::Identities(cmd) => run_identities(&cli.config, cmd),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "keygate", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            let page = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
            page.render(&mut std::io::stdout())
                .map_err(|e| format!("cannot write the manual page: {e}"))
        }
        Command::Tokens(cmd) => run_tokens(&cli.config, cmd),
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

/// How many threads a runtime runs its tasks on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// The lighter single-thread runtime.
    One,
    /// One per core, tasks moving between them.
    PerCore,
}

/// A tokio runtime on `threads`.
pub fn runtime(threads: Threads) -> Result<tokio::runtime::Runtime, String> {
    let built = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Threads::PerCore => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    built.map_err(|e| format!("cannot start the runtime: {e}"))
}

fn serve(config_path: &Path) -> Result<(), String> {
    let config = Config::load(config_path).map_err(|e| config_errors(&e))?;
    // Checked before the runtime starts its threads; the snapshot checks everything else.
    let mut problems = crate::config::Problems::default();
    let ranges = crate::config::ranges::WORKERS;
    if crate::config::ranges::within(config.workers, ranges, "workers", &mut problems).is_none() {
        let src = crate::config::read_source(config_path).unwrap_or_default();
        return Err(config_errors(&problems.locate(config_path, &src)));
    }
    // Before the runtime's threads: reading them takes the variables out of the environment.
    let inherited = crate::server::Inherited::from_env();
    let workers = match config.workers {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        n => n,
    };
    // The admin listener, housekeeping and reloads run here; with two workers or more the
    // clients' connections are served on the workers' threads (`server::start_with`).
    runtime(Threads::One)?.block_on(async {
        let gateway = crate::gateway::Gateway::new(config_path, Clock::real())
            .map_err(|e| config_errors(&e))?;
        let signals = crate::server::Signals::catch().map_err(|e| e.to_string())?;
        let running = crate::server::start_with(gateway, true, inherited, workers)
            .await
            .map_err(|e| e.to_string())?;
        running
            .run_until_signal(signals)
            .await
            .map_err(|e| e.to_string())
    })
}

fn check(config_path: &Path) -> Result<(), String> {
    let limiters = Limiters::new();
    let usage = UsageBook::in_memory();
    let metrics = crate::metrics::Metrics::default();
    let ctx = BuildContext {
        config_path,
        generation: 0,
        limiters: &limiters,
        metrics: &metrics,
        usage: &usage,
        previous: None,
        env_admin_token: None,
    };
    // Building a snapshot makes an upstream pool, which needs a runtime's context.
    let rt = runtime(Threads::One)?;
    let _guard = rt.enter();
    match Snapshot::load(&ctx) {
        Ok(s) => {
            println!(
                "{}: ok ({}, {} in {})",
                config_path.display(),
                crate::keys::counted(s.routes.len(), "route"),
                crate::keys::counted(s.key_count(), "key"),
                s.store.path().display()
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

/// The CLI's name in `created_by` and the audit log: `cli:<user>`.
fn cli_actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

fn run_identities(config_path: &Path, cmd: IdentitiesCommand) -> Result<(), String> {
    use crate::keys::identity::{self, IdentityBody, IdentityRecord};
    let config = Config::load(config_path).map_err(|e| config_errors(&e))?;
    let store = Store::for_config(&config, config_path).map_err(|e| e.to_string())?;
    let actor = cli_actor();
    let now = Clock::real().unix_secs();
    let journal = crate::state::credits::CreditBook::open(crate::state::credits::journal_path(
        &config.usage_path(config_path),
    ));
    // As the API shows it, with what its credits have left by this node's journal.
    let view = |r: &IdentityRecord| {
        let mut v = serde_json::to_value(r).unwrap_or_default();
        let checked = r.credits.as_ref().map(crate::keys::check::check_credits);
        if let (Some(Ok(c)), Some(stored)) = (checked, v.get("credits").cloned()) {
            let shown = journal.show(&format!("@{}", r.id), &stored, &c, now);
            crate::keys::set_member(&mut v, "credits", shown);
        }
        v
    };
    let audit = |action: &str, reason: String| {
        let event = AuditEvent::new(now, &actor, action).reason(reason);
        if let Err(e) = crate::audit::append(&config.audit_path(config_path), &event) {
            eprintln!("keygate: warning: the change is saved, but the audit log could not be written: {e}");
        }
    };
    let stored = || -> Result<Vec<IdentityRecord>, String> {
        let (file, _) = store.load().map_err(|e| config_errors(&e))?;
        Ok(file
            .identities
            .into_iter()
            .filter_map(|d| serde_json::from_value(d).ok())
            .collect())
    };
    let not_found = |id: &str| format!("no identity has id `{id}`");
    match cmd {
        IdentitiesCommand::Put(args) => {
            let body = IdentityBody {
                rate_limits: limit_flags(&args.limits)?,
                quota: args.quota,
                credits: credit_flags(args.credits, args.refill.as_deref())?.map(|c| {
                    identity::CreditsBody {
                        remaining: c.remaining,
                        refill: c.refill,
                    }
                }),
                meta: meta_flags(&args.meta)?,
            };
            let id = args.id;
            let (record, before, created) = store
                .change_side(Side::Identities, |docs| {
                    let before = identity::find(docs, &id);
                    let record = IdentityRecord::from_body(&id, body, before.as_ref(), now)
                        .map_err(|p| KeyError::Invalid {
                            field: p.field,
                            message: p.message,
                        })?;
                    let created = identity::put(docs, &record);
                    Ok((record, before, created))
                })
                .map_err(|e| match e {
                    KeyError::Invalid {
                        field: "id",
                        message,
                    } => message,
                    e => flag_error(e),
                })?;
            if created {
                audit("identity.created", identity::describe(&record));
            } else if before.as_ref() != Some(&record) {
                let was = before.as_ref().map(identity::describe).unwrap_or_default();
                audit(
                    "identity.updated",
                    format!("{was} → {}", identity::describe(&record)),
                );
            }
            if args.json {
                print_json(&view(&record));
            } else {
                let verb = if created { "Created" } else { "Replaced" };
                println!("{verb} identity {}.", identity::describe(&record));
                println!(
                    "Keys naming it (--identity {}) share these limits from their next request.",
                    record.id
                );
            }
            Ok(())
        }
        IdentitiesCommand::List { json } => {
            let all = stored()?;
            if json {
                let views: Vec<_> = all.iter().map(view).collect();
                print_json(&serde_json::json!({ "identities": views }));
            } else if all.is_empty() {
                println!("No identities.");
            } else {
                for r in &all {
                    println!("{}", identity::describe(r));
                }
            }
            Ok(())
        }
        IdentitiesCommand::Show { id, json } => {
            let all = stored()?;
            let record = all
                .iter()
                .find(|r| r.id == id)
                .ok_or_else(|| not_found(&id))?;
            let v = view(record);
            if json {
                print_json(&v);
                return Ok(());
            }
            let text = |member: &str| {
                v.get(member).map_or("-".to_string(), |m| match m {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
            };
            let limits: Vec<String> = record
                .rate_limits
                .iter()
                .map(|l| match l.burst {
                    Some(b) => format!("{} {} (burst {b})", l.name, l.limit),
                    None => format!("{} {}", l.name, l.limit),
                })
                .collect();
            let limits = match limits.is_empty() {
                true => "(none)".to_string(),
                false => limits.join(", "),
            };
            println!("id:          {}", record.id);
            println!("rate limits: {limits}");
            println!("quota:       {}", text("quota"));
            let credits = v.get("credits").map_or("(none)".to_string(), |c| {
                let mut said = format!("{} left", c["remaining"]);
                if let Some(r) = c.get("refill") {
                    let every = r["interval"].as_str().unwrap_or_default();
                    said.push_str(&format!(", back to {} {every}", r["amount"]));
                }
                if let Some(next) = c["next_refill"].as_str() {
                    said.push_str(&format!(", next at {next}"));
                }
                said
            });
            println!("credits:     {credits}");
            println!("meta:        {}", text("meta"));
            println!("created:     {}", record.created_at);
            println!(
                "updated:     {}",
                record.updated_at.as_deref().unwrap_or("-")
            );
            Ok(())
        }
        IdentitiesCommand::Delete { id } => {
            let removed = store
                .change_side(Side::Identities, |docs| Ok(identity::remove(docs, &id)))
                .map_err(|e| e.to_string())?;
            let removed = removed.ok_or_else(|| not_found(&id))?;
            audit("identity.deleted", identity::describe(&removed));
            println!(
                "Deleted identity {}. Its keys keep the name and lose its limits.",
                removed.id
            );
            Ok(())
        }
    }
}

/// `keygate tokens`: the store's admin tokens, written directly to the store (as `keygate
/// keys` and `keygate identities` do), which a running gateway follows.
fn run_tokens(config_path: &Path, cmd: TokensCommand) -> Result<(), String> {
    use crate::keys::admin_token::{self, AdminToken, NewToken, Revoked};
    let config = Config::load(config_path).map_err(|e| config_errors(&e))?;
    let store = Store::for_config(&config, config_path).map_err(|e| e.to_string())?;
    let actor = cli_actor();
    let now = Clock::real().unix_secs();
    // `keygate check` reports a bad config token; here, the good ones are enough.
    let config_tokens =
        admin_token::compile_config(&config, None, &mut crate::config::Problems::default());
    let audit = |action: &str, reason: String| {
        let event = AuditEvent::new(now, &actor, action).reason(reason);
        if let Err(e) = crate::audit::append(&config.audit_path(config_path), &event) {
            eprintln!("keygate: warning: the change is saved, but the audit log could not be written: {e}");
        }
    };
    let stored = || -> Result<Vec<serde_json::Value>, String> {
        Ok(store.load().map_err(|e| config_errors(&e))?.0.admin_tokens)
    };
    let in_config = |name: &str| {
        format!(
            "admin token `{name}` is written in the config file ({}): remove it there",
            config_path.display()
        )
    };
    match cmd {
        TokensCommand::Create {
            name,
            role,
            expires,
            json,
        } => {
            let new = NewToken {
                name,
                role,
                expires,
            };
            let (record, token) = admin_token::mint(&new, &actor, now).map_err(flag_error)?;
            let added = store
                .change_side(Side::AdminTokens, |docs| {
                    admin_token::add(docs, &record, &config_tokens)
                })
                .map_err(|e| e.to_string())?;
            if !added {
                return Err(format!(
                    "--name: an admin token named `{}` exists already",
                    record.name
                ));
            }
            audit("admin_token.created", admin_token::describe(&record));
            if json {
                let made = admin_token::check(&record).map_err(|p| p.message)?;
                let mut v = admin_token::view(&made, Some(&record), None, now);
                crate::keys::set_member(&mut v, "token", token);
                print_json(&v);
            } else {
                println!("Created admin token {}.", admin_token::describe(&record));
                println!("This is the only time the token is shown; only its SHA-256 is stored:\n");
                println!("    {token}\n");
                println!("A running gateway accepts it within a second: `Authorization: Bearer <token>`.");
            }
            Ok(())
        }
        TokensCommand::List { json } => {
            let docs = stored()?;
            let used = crate::state::token_use::read(&crate::state::token_use::book_path(
                &config.usage_path(config_path),
            ));
            let mut problems = crate::config::Problems::default();
            let all: Vec<AdminToken> = config_tokens
                .iter()
                .cloned()
                .chain(admin_token::compile_stored(&docs, &mut problems))
                .collect();
            let views: Vec<serde_json::Value> = all
                .iter()
                .map(|t| {
                    let record = admin_token::find(&docs, &t.name)
                        .filter(|_| t.source == admin_token::Source::Store);
                    let last = used.get(&format!("sha256:{}", keys::hex(&t.hash))).copied();
                    admin_token::view(t, record.as_ref(), last, now)
                })
                .collect();
            if json {
                print_json(&serde_json::json!({ "tokens": views }));
            } else {
                print_tokens(&views);
            }
            Ok(())
        }
        TokensCommand::Revoke { name } => {
            if admin_token::find(&stored()?, &name).is_none() {
                return Err(if config_tokens.iter().any(|t| t.name == name) {
                    in_config(&name)
                } else {
                    format!("no admin token in the store is named `{name}`")
                });
            }
            let outcome = store
                .change_side(Side::AdminTokens, |docs| {
                    Ok(admin_token::revoke(docs, &name, None, &[], now))
                })
                .map_err(|e| e.to_string())?;
            match outcome {
                Revoked::Done(record) => {
                    audit("admin_token.revoked", admin_token::describe(&record));
                    println!(
                        "Revoked admin token {}: a running gateway refuses it within a second.",
                        record.name
                    );
                    Ok(())
                }
                Revoked::NotFound | Revoked::LastAdmin => {
                    Err(format!("no admin token in the store is named `{name}`"))
                }
            }
        }
    }
}

/// The tokens' views as a table.
fn print_tokens(views: &[serde_json::Value]) {
    if views.is_empty() {
        println!(
            "No admin tokens. Make one with `keygate tokens create --name NAME --role admin`."
        );
        return;
    }
    let text = |v: &serde_json::Value, member: &str, none: &str| match &v[member] {
        serde_json::Value::String(s) => s.clone(),
        _ => none.to_string(),
    };
    let header = ["NAME", "ROLE", "SOURCE", "STATUS", "LAST USED", "EXPIRES"];
    let rows: Vec<[String; 6]> = views
        .iter()
        .map(|v| {
            [
                text(v, "name", "-"),
                text(v, "role", "-"),
                text(v, "source", "-"),
                text(v, "status", "-"),
                text(v, "last_used_at", "never"),
                text(v, "expires_at", "never"),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
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

fn run_keys(config_path: &Path, cmd: KeysCommand) -> Result<(), String> {
    let config = Config::load(config_path).map_err(|e| config_errors(&e))?;
    let store = Store::for_config(&config, config_path).map_err(|e| e.to_string())?;
    let actor = cli_actor();
    let now = Clock::real().unix_secs();
    let op = Op {
        store: &store,
        config: &config,
        actor: &actor,
        now,
    };
    let usage = crate::state::usage::read_file(&config.usage_path(config_path), now);
    let quiet = config.quiet_period_secs();
    // What the gateway's journal holds as spent: every credit it leased counts, so what the
    // CLI shows as left is never more than the gateway would admit.
    let journal = crate::state::credits::CreditBook::open(crate::state::credits::journal_path(
        &config.usage_path(config_path),
    ));
    let view = |r: &KeyRecord| {
        let report = usage.get(&r.id);
        let mut v = r.view(now, report.and_then(|u| u.last_use.as_ref()), quiet);
        if let Some(report) = report {
            crate::keys::set_member(&mut v, "usage", report.to_json(now));
        }
        if let Some(credits) = r
            .credits
            .as_ref()
            .and_then(|c| crate::keys::check::check_credits(c).ok())
        {
            let stored = v.get("credits").cloned().unwrap_or_default();
            crate::keys::set_member(
                &mut v,
                "credits",
                journal.show(&r.id, &stored, &credits, now),
            );
        }
        v
    };
    let audit = |event: AuditEvent| {
        if let Err(e) = crate::audit::append(&config.audit_path(config_path), &event) {
            eprintln!("keygate: warning: the change is saved, but the audit log could not be written: {e}");
        }
    };
    match cmd {
        KeysCommand::Create(args) => {
            let new = NewKey {
                namespace: args.namespace,
                environment: args.environment,
                name: args.name,
                scopes: args.scopes,
                allowed_cidrs: args.allow_cidrs,
                rate_limit: args.rate_limit,
                burst: args.burst,
                rate_limits: limit_flags(&args.limits)?,
                identity: args.identity,
                quota: args.quota,
                expires: args.expires,
                note: args.note,
                meta: meta_flags(&args.meta)?,
                credits: credit_flags(args.credits, args.refill.as_deref())?,
            };
            let (record, secret) = keys::create(op, new).map_err(flag_error)?;
            audit(AuditEvent::new(now, &actor, "key.created").key(&record));
            print_secret(&record, &secret, view(&record), args.json, "Created key");
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
                let views: Vec<_> = keys.iter().map(|r| view(r)).collect();
                print_json(&serde_json::json!({"keys": views}));
            } else {
                print_table(&keys, now, &usage);
            }
            Ok(())
        }
        KeysCommand::Show { id, json } => {
            let record = store
                .get(&id)
                .map_err(flag_error)?
                .ok_or_else(|| KeyError::NotFound(id).to_string())?;
            if json {
                print_json(&view(&record));
            } else {
                print_record(&view(&record));
            }
            Ok(())
        }
        KeysCommand::Revoke { id } => change_status(op, &id, Status::Revoked, &audit),
        KeysCommand::Disable { id } => change_status(op, &id, Status::Inactive, &audit),
        KeysCommand::Enable { id } => change_status(op, &id, Status::Active, &audit),
        KeysCommand::Credits { id, add, set, json } => {
            let how = match (add, set) {
                (Some(n), _) => keys::TopUp::Add(n),
                (None, n) => keys::TopUp::Set(n.unwrap_or(0)),
            };
            let (record, before) = keys::top_up(op, &id, how, |r| credits_left(&journal, r, now))
                .map_err(flag_error)?;
            let said = match how {
                keys::TopUp::Add(n) => format!("added {n}"),
                keys::TopUp::Set(n) => format!("set to {n}"),
            };
            audit(
                AuditEvent::new(now, &actor, "key.credits_set")
                    .key(&record)
                    .reason(format!(
                        "{said}; the balance as set was {}",
                        before.map_or(0, |c| c.remaining)
                    )),
            );
            if json {
                print_json(&view(&record));
            } else {
                let left = credits_left(&journal, &record, now);
                println!("Key {}: {left} credits left.", record.id);
            }
            Ok(())
        }
        KeysCommand::Leaked {
            file,
            action,
            source,
            json,
        } => {
            let action = keys::LeakAction::parse(&action).map_err(|e| format!("--action: {e}"))?;
            crate::keys::check::check_text(&source, crate::keys::check::MAX_LEAK_URL_CHARS, false)
                .map_err(|e| format!("--source {e}"))?;
            let tokens = crate::scanning::tokens_in(&read_input(&file)?);
            if tokens.is_empty() {
                return Err(format!("{}: no keys in it", file.display()));
            }
            let mut found = keys::leaked(op, &tokens, action, &source).map_err(flag_error)?;
            let mut alerts = Vec::new();
            // Admin tokens, by hash: a stored one is revoked (unless only reporting), the
            // config's only reported (see `scanning::report`).
            let hashes: Vec<[u8; 32]> = tokens.iter().map(|t| keys::format::hash(t)).collect();
            let mut ignored = crate::config::Problems::default();
            let (file, _) = store.load().map_err(|e| config_errors(&e))?;
            let admin_tokens: Vec<_> =
                keys::admin_token::compile_config(&config, None, &mut ignored)
                    .into_iter()
                    .chain(keys::admin_token::compile_stored(
                        &file.admin_tokens,
                        &mut ignored,
                    ))
                    .collect();
            let actions = keys::admin_token::leak_actions(&hashes, &admin_tokens, action);
            let revoked = keys::admin_token::to_revoke(&hashes, &actions);
            if !revoked.is_empty() {
                store
                    .change_side(Side::AdminTokens, |docs| {
                        Ok(keys::admin_token::leaked(docs, &revoked, true))
                    })
                    .map_err(|e| e.to_string())?;
            }
            for (f, leaked) in found.iter_mut().zip(actions) {
                if let Some(leaked) = leaked {
                    let (event, alert) =
                        crate::scanning::notice_token(now, &actor, &leaked, &source);
                    audit(event);
                    alerts.push(alert);
                    f.admin_token = Some(leaked);
                }
            }
            for record in found.iter().filter_map(|f| f.key.as_ref()) {
                let (event, alert) = crate::scanning::notice(now, &actor, record, &source, action);
                audit(event);
                alerts.push(alert);
            }
            send_alerts(&config, config_path, &alerts);
            if json {
                print_json(&crate::scanning::answer(&found, action));
            } else {
                for f in &found {
                    match (&f.key, &f.admin_token) {
                        (Some(k), _) => println!(
                            "true_positive   key {} ({}): {}",
                            k.id,
                            k.namespace,
                            action.as_str()
                        ),
                        (None, Some(t)) if t.source == keys::admin_token::Source::Store => {
                            println!(
                                "true_positive   admin token {}: {}",
                                t.name,
                                t.action.as_str()
                            )
                        }
                        (None, Some(t)) => println!(
                            "true_positive   admin token {} ({}): report only; remove it from the config",
                            t.name,
                            t.source.as_str()
                        ),
                        (None, None) => println!("false_positive  sha256:{}", f.token_hash),
                    }
                }
            }
            Ok(())
        }
        KeysCommand::Regenerate { id, json } => {
            let (record, secret) = keys::regenerate(op, &id).map_err(flag_error)?;
            audit(AuditEvent::new(now, &actor, "key.regenerated").key(&record));
            print_secret(&record, &secret, view(&record), json, "Regenerated key");
            if !json {
                println!("The old secret stopped working: its clients get 401 until they use the new one.");
            }
            Ok(())
        }
        KeysCommand::Rotate { id, grace, json } => {
            let grace = grace.unwrap_or_else(|| config.rotation.default_grace.clone());
            let grace = crate::config::units::parse_duration(&grace)
                .map_err(|e| format!("--grace: {e}"))?;
            let (new, secret, old) = keys::rotate(op, &id, grace.as_secs()).map_err(flag_error)?;
            let until = old.expires_at.clone().unwrap_or_default();
            audit(
                AuditEvent::new(now, &actor, "key.created")
                    .key(&new)
                    .rotated_from(&old.id),
            );
            audit(
                AuditEvent::new(now, &actor, "key.rotated")
                    .key(&old)
                    .reason(format!(
                        "replaced by {}; the old key works until {until}",
                        new.id
                    )),
            );
            if json {
                let mut v = view(&new);
                crate::keys::set_member(&mut v, "key", secret);
                crate::keys::set_member(&mut v, "previous_key", view(&old));
                print_json(&v);
            } else {
                print_secret(
                    &new,
                    &secret,
                    view(&new),
                    false,
                    &format!("Rotated {} to new key", old.id),
                );
                println!(
                    "The old key {} keeps working until {until}, then answers 401 expired_key.",
                    old.id
                );
                println!(
                    "`keygate keys show {}` tells when it is safe to revoke.",
                    old.id
                );
            }
            Ok(())
        }
        KeysCommand::Update(args) => {
            let json = args.json;
            let id = args.id.clone();
            let risky = !args.scopes.is_empty()
                || args.clear_scopes
                || !args.allow_cidrs.is_empty()
                || args.clear_cidrs
                || args.rate_limit.is_some()
                || args.burst.is_some()
                || args.clear_rate_limit
                || !args.limits.is_empty()
                || args.identity.is_some()
                || args.clear_identity
                || args.quota.is_some()
                || args.clear_quota
                || args.expires.is_some();
            let patch = KeyPatch {
                name: args.name,
                scopes: (args.clear_scopes || !args.scopes.is_empty()).then_some(args.scopes),
                allowed_cidrs: (args.clear_cidrs || !args.allow_cidrs.is_empty())
                    .then_some(args.allow_cidrs),
                rate_limit: if args.clear_rate_limit {
                    Some(None)
                } else {
                    args.rate_limit.map(Some)
                },
                burst: if args.clear_rate_limit {
                    Some(None)
                } else {
                    args.burst.map(Some)
                },
                rate_limits: (args.clear_limits || !args.limits.is_empty())
                    .then(|| limit_flags(&args.limits))
                    .transpose()?,
                identity: if args.clear_identity {
                    Some(None)
                } else {
                    args.identity.map(Some)
                },
                quota: if args.clear_quota {
                    Some(None)
                } else {
                    args.quota.map(Some)
                },
                expires: args.expires.map(|e| (e != "never").then_some(e)),
                note: args.note,
                meta: if args.clear_meta {
                    Some(None)
                } else {
                    meta_flags(&args.meta)?.map(Some)
                },
                credits: if args.clear_credits {
                    Some(None)
                } else {
                    credit_flags(args.credits, args.refill.as_deref())?.map(Some)
                },
            };
            let (record, changes) = keys::update(op, &id, patch).map_err(flag_error)?;
            if !changes.is_empty() {
                audit(
                    AuditEvent::new(now, &actor, "key.updated")
                        .key(&record)
                        .reason(changes.join("; ")),
                );
            }
            if json {
                print_json(&view(&record));
            } else if changes.is_empty() {
                println!(
                    "Key {} already had these settings; nothing changed.",
                    record.id
                );
            } else {
                println!("Key {} updated: {}.", record.id, changes.join("; "));
                if risky {
                    println!("The new settings apply from the next request: calls that passed before may start failing.");
                }
            }
            Ok(())
        }
        KeysCommand::Export => {
            let text = keys::export(&store).map_err(|e| e.to_string())?;
            std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())
                .map_err(|e| format!("cannot write standard output: {e}"))
        }
        KeysCommand::Load { file, json } => {
            let text = read_input(&file)?;
            if text.trim().is_empty() {
                return Err(format!("{}: empty; nothing loaded", file.display()));
            }
            let incoming = crate::keys::store::parse(&file, &text).map_err(|errors| {
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            })?;
            let loaded = keys::load(op, incoming).map_err(flag_error)?;
            audit(AuditEvent::new(now, &actor, "key.loaded").reason(format!(
                "{} added, {} replaced, from {}",
                loaded.added,
                loaded.replaced,
                file.display()
            )));
            if json {
                print_json(
                    &serde_json::json!({"added": loaded.added, "replaced": loaded.replaced}),
                );
            } else {
                println!(
                    "Loaded {} keys into {}: {} added, {} replaced.",
                    loaded.added.saturating_add(loaded.replaced),
                    store.path().display(),
                    loaded.added,
                    loaded.replaced
                );
            }
            Ok(())
        }
        KeysCommand::Import {
            namespace,
            environment,
            file,
            json,
        } => {
            let text = read_input(&file)?;
            let entries = keys::parse_import(&text).map_err(flag_error)?;
            if entries.is_empty() {
                return Err(format!("{}: no keys found", file.display()));
            }
            let added = keys::import(op, &namespace, &environment, entries).map_err(flag_error)?;
            audit(AuditEvent::new(now, &actor, "key.imported").reason(format!(
                "{} keys into {namespace}/{environment}",
                added.len()
            )));
            if json {
                let ids: Vec<&str> = added.iter().map(|r| r.id.as_str()).collect();
                print_json(&serde_json::json!({"imported": added.len(), "ids": ids}));
            } else {
                println!("Imported {} keys into {namespace}/{environment}; only their SHA-256 hashes are stored.", added.len());
            }
            Ok(())
        }
    }
}

/// A file's text, or standard input's for `-`.
/// Sends alerts to the configured webhook, from the CLI's own short-lived runtime; a
/// failed delivery is a warning, as the change is already saved.
fn send_alerts(config: &Config, config_path: &Path, alerts: &[serde_json::Value]) {
    let base = config_path.parent().unwrap_or(Path::new("."));
    let mut problems = crate::config::Problems::default();
    let rules = crate::alerts::AlertRules::compile(&config.alerts, base, &mut problems);
    let Some(webhook) = rules.webhook.filter(|_| !alerts.is_empty()) else {
        return;
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return eprintln!("keygate: warning: the alert webhook was not called: {e}"),
    };
    for alert in alerts {
        if !runtime.block_on(crate::alerts::deliver(&webhook, alert)) {
            eprintln!(
                "keygate: warning: the change is saved, but the alert webhook did not take it"
            );
        }
    }
}

fn read_input(file: &Path) -> Result<String, String> {
    if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| format!("cannot read standard input: {e}"))
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))
    }
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn print_secret(
    record: &KeyRecord,
    secret: &str,
    mut view: serde_json::Value,
    json: bool,
    what: &str,
) {
    if json {
        crate::keys::set_member(&mut view, "key", secret);
        print_json(&view);
    } else {
        println!(
            "{what} {} ({}/{}).",
            record.id, record.namespace, record.environment
        );
        println!("This is the only time the secret is shown; only its SHA-256 is stored:\n");
        println!("  {secret}\n");
    }
}

fn change_status(
    op: Op<'_>,
    id: &str,
    status: Status,
    audit: &dyn Fn(AuditEvent),
) -> Result<(), String> {
    let record = keys::set_status(op, id, status).map_err(flag_error)?;
    let (action, done) = match status {
        Status::Revoked => (
            "key.revoked",
            "revoked: its clients get 401 revoked_key from the next request",
        ),
        Status::Inactive => ("key.disabled", "disabled"),
        Status::Active => ("key.enabled", "enabled"),
    };
    audit(AuditEvent::new(op.now, op.actor, action).key(&record));
    println!(
        "Key {} ({}/{}) {done}.",
        record.id, record.namespace, record.environment
    );
    Ok(())
}

/// Names the command-line flag behind a field error.
/// What is left of a record's credits at `now`, by the journal.
fn credits_left(journal: &crate::state::credits::CreditBook, r: &KeyRecord, now: i64) -> u64 {
    r.credits
        .as_ref()
        .and_then(|c| crate::keys::check::check_credits(c).ok())
        .map_or(0, |c| journal.left(&r.id, &c, now))
}

/// `--credits N [--refill N/day|N/month[@DAY]]` as the credits they set.
fn credit_flags(
    credits: Option<u64>,
    refill: Option<&str>,
) -> Result<Option<crate::keys::CreditsRecord>, String> {
    let Some(remaining) = credits else {
        return Ok(None);
    };
    let refill = refill
        .map(|text| {
            let bad = || format!("--refill: `{text}` is not N/day, N/month or N/month@DAY");
            let (amount, per) = text.split_once('/').ok_or_else(bad)?;
            let amount: u64 = amount.trim().parse().map_err(|_| bad())?;
            let (interval, day) = match per.split_once('@') {
                Some((p, d)) => (p, Some(d.trim().parse::<u32>().map_err(|_| bad())?)),
                None => (per, None),
            };
            let interval = match interval.trim() {
                "day" | "daily" => "daily",
                "month" | "monthly" => "monthly",
                _ => return Err(bad()),
            };
            Ok(crate::keys::RefillRecord {
                amount,
                interval: interval.into(),
                day_of_month: day,
            })
        })
        .transpose()?;
    Ok(Some(crate::keys::CreditsRecord {
        remaining,
        refill,
        set_at: None,
        version: 0,
    }))
}

/// `--meta NAME=VALUE` flags as a metadata object (each value text); none given: `None`.
fn meta_flags(
    flags: &[String],
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, String> {
    if flags.is_empty() {
        return Ok(None);
    }
    let mut meta = serde_json::Map::new();
    for flag in flags {
        let Some((name, value)) = flag.split_once('=').filter(|(n, _)| !n.is_empty()) else {
            return Err(format!("--meta: `{flag}` is not NAME=VALUE"));
        };
        meta.insert(name.to_string(), value.into());
    }
    Ok(Some(meta))
}

/// `--limit NAME=RATE[:BURST]` flags as named limits.
fn limit_flags(flags: &[String]) -> Result<Vec<keys::NamedLimitRecord>, String> {
    flags
        .iter()
        .map(|flag| {
            let bad = || format!("--limit: `{flag}` is not NAME=RATE or NAME=RATE:BURST");
            let (name, spec) = flag.split_once('=').ok_or_else(bad)?;
            let (limit, burst) = match spec.split_once(':') {
                Some((limit, burst)) => (limit, Some(burst.parse::<u32>().map_err(|_| bad())?)),
                None => (spec, None),
            };
            Ok(keys::NamedLimitRecord {
                name: name.to_string(),
                limit: limit.to_string(),
                burst,
            })
        })
        .collect()
}

fn flag_error(e: KeyError) -> String {
    match e {
        KeyError::Invalid { field, message } => {
            let flag = match field {
                "scopes" => "--scope",
                "allowed_cidrs" => "--allow-cidr",
                "rate_limit" => "--rate-limit",
                "rate_limits" => "--limit",
                "identity" => "--identity",
                "expires_at" => "--expires",
                "namespace" => "--namespace",
                "environment" => "--environment",
                "burst" => "--burst",
                "quota" => "--quota",
                "name" => "--name",
                "role" => "--role",
                "note" => "--note",
                "meta" => "--meta",
                "credits" => "--credits",
                "grace_seconds" => "--grace",
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

fn print_table(
    keys: &[&KeyRecord],
    now: i64,
    usage: &std::collections::BTreeMap<String, UsageReport>,
) {
    if keys.is_empty() {
        println!(
            "No keys. Create one with `keygate keys create --namespace NS --environment ENV`."
        );
        return;
    }
    let rows: Vec<[String; 8]> = keys
        .iter()
        .map(|r| {
            [
                r.id.clone(),
                if r.prefix.is_empty() {
                    "(imported)".into()
                } else {
                    r.prefix.clone()
                },
                if r.name.is_empty() {
                    "-".into()
                } else {
                    r.name.clone()
                },
                format!("{}/{}", r.namespace, r.environment),
                r.effective_status(now).to_string(),
                usage
                    .get(&r.id)
                    .and_then(|u| u.last_use.as_ref())
                    .map_or_else(|| "never".into(), |u| crate::clock::rfc3339(u.at)),
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
        "LAST USED",
        "EXPIRES",
        "CREATED",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 8]| {
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

/// A key's view as `name: value` lines.
fn print_record(v: &serde_json::Value) {
    let text = |k: &str| match &v[k] {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) if s.is_empty() => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) if a.is_empty() => "-".to_string(),
        serde_json::Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    };
    let rate = match (text("rate_limit").as_str(), text("burst").as_str()) {
        ("-", _) => "(none)".to_string(),
        (rate, "-") => rate.to_string(),
        (rate, burst) => format!("{rate}, burst {burst}"),
    };
    let scopes = if text("scopes") == "-" {
        "(full access)".to_string()
    } else {
        text("scopes")
    };
    let cidrs = if text("allowed_cidrs") == "-" {
        "(any address)".to_string()
    } else {
        text("allowed_cidrs")
    };
    let lines = [
        ("id", text("id")),
        ("name", text("name")),
        ("prefix", text("prefix")),
        ("namespace", text("namespace")),
        ("environment", text("environment")),
        ("status", text("status")),
        ("scopes", scopes),
        ("allowed CIDRs", cidrs),
        ("rate limit", rate),
        (
            "expires",
            if text("expires_at") == "-" {
                "never".into()
            } else {
                text("expires_at")
            },
        ),
        (
            "created",
            format!("{} by {}", text("created_at"), text("created_by")),
        ),
        (
            "last used",
            if text("last_used_at") == "-" {
                "never".into()
            } else {
                format!("{} from {}", text("last_used_at"), text("last_used_ip"))
            },
        ),
        ("note", text("note")),
    ];
    for (name, value) in lines {
        println!("{:<14} {value}", format!("{name}:"));
    }
    for (key, label) in [
        ("rotated_to", "rotated to"),
        ("rotated_from", "rotated from"),
        ("revoked_at", "revoked"),
        ("regenerated_at", "regenerated"),
    ] {
        if !v[key].is_null() {
            println!("{:<14} {}", format!("{label}:"), text(key));
        }
    }
    let usage = &v["usage"];
    if !usage.is_null() {
        let rate = usage["error_rate"].as_f64().unwrap_or(0.0) * 100.0;
        println!(
            "{:<14} {} requests ({} accepted, {} refused), error rate {rate:.1}%",
            "today:", usage["requests_today"], usage["accepted_today"], usage["refused_today"]
        );
        if let Some(codes) = usage["by_code_today"].as_object().filter(|c| !c.is_empty()) {
            let list: Vec<String> = codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
            println!("{:<14} {}", "refusals:", list.join(", "));
        }
    }
    if !v["quota"].is_null() {
        println!("{:<14} {}", "quota:", text("quota"));
    }
    if let Some(safe) = v["safe_to_revoke"].as_bool() {
        println!(
            "{:<14} {}",
            "safe to revoke:",
            if safe {
                "yes: it has been quiet for the whole quiet period"
            } else {
                "not yet: it is still in use"
            }
        );
    }
}
