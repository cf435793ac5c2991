use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use capgate::{Catalog, Policy};

#[derive(Subcommand)]
pub(crate) enum PolicyCommand {
    /// Validate a policy file; print every error as FILE:LINE:COL: message.
    Check {
        /// The policy file.
        file: PathBuf,
        #[command(flatten)]
        schema: SchemaArgs,
    },
    /// Say whether a client class may call a method, and which rule decides.
    Explain(ExplainArgs),
    /// Walk the capabilities each client class can reach from the bootstrap interface:
    /// what it may call, dead rules, wildcard grants, opaque results, callbacks. Exit
    /// status: 0 no warnings, 1 warnings (dead rules, opaque escapes), 2 cannot run.
    Audit(AuditArgs),
}

/// The schema a policy names interfaces of.
#[derive(Args)]
pub(crate) struct SchemaArgs {
    /// A schema file: `.capnp` text, or a compiled CodeGeneratorRequest
    /// (`capnp compile -o- app.capnp > app.cgr`). Repeatable. Default: capgate's demo schema.
    #[arg(long = "schema", value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Where `.capnp` text files' absolute imports (`/dir/file.capnp`) are looked up.
    /// Repeatable; relative imports are resolved against the importing file.
    #[arg(long = "import-path", value_name = "DIR")]
    import_paths: Vec<PathBuf>,
}

impl SchemaArgs {
    pub(crate) fn catalog(&self) -> Result<Catalog, String> {
        if self.files.is_empty() {
            if !self.import_paths.is_empty() {
                return Err("--import-path needs --schema".into());
            }
            return Ok(Catalog::builtin().clone());
        }
        capgate::schema::load(&self.files, &self.import_paths)
    }
}

#[derive(Args)]
pub(crate) struct ExplainArgs {
    /// The policy file.
    file: PathBuf,
    #[command(flatten)]
    schema: SchemaArgs,
    /// The client class.
    #[arg(long)]
    client: String,
    /// The method, as `Interface.method` (e.g. Namespace.put, Vault.Admin.wipe,
    /// app.capnp:Box.store).
    method: String,
}

#[derive(Args)]
pub(crate) struct AuditArgs {
    /// The policy file.
    file: PathBuf,
    #[command(flatten)]
    schema: SchemaArgs,
    /// The interface clients get first (e.g. Store; `file.capnp:Name` if two files
    /// declare it).
    #[arg(long)]
    bootstrap: String,
    /// Print the report as JSON (its shape: see README, "Policy audit").
    #[arg(long)]
    json: bool,
}

/// Exit status of `policy audit` when the report has warnings (2 is for "cannot run").
const AUDIT_WARNINGS: u8 = 1;
/// Exit status of `policy audit` when it cannot run: unreadable or invalid files, an
/// unknown bootstrap interface. Distinct from 1 so that CI can tell warnings from breakage.
const AUDIT_CANNOT_RUN: u8 = 2;

pub(crate) fn run(cmd: PolicyCommand) -> Result<ExitCode, super::Failure> {
    let done = match cmd {
        PolicyCommand::Audit(a) => {
            return audit(&a).map_err(|e| super::Failure::new(e, AUDIT_CANNOT_RUN))
        }
        PolicyCommand::Check { file, schema } => check(&file, &schema),
        PolicyCommand::Explain(a) => explain(&a),
    };
    super::succeeded(done)
}

fn check(file: &std::path::Path, schema: &SchemaArgs) -> Result<(), String> {
    let catalog = &schema.catalog()?;
    let p = load(file, catalog)?;
    let names: Vec<String> = p
        .classes()
        .iter()
        .map(|c| format!("{} ({})", c.name(), c.matcher()))
        .collect();
    println!(
        "{}: ok: {} client classes: {}",
        file.display(),
        names.len(),
        names.join(", ")
    );
    Ok(())
}

fn explain(a: &ExplainArgs) -> Result<(), String> {
    let catalog = &a.schema.catalog()?;
    let p = load(&a.file, catalog)?;
    let class = p.class(&a.client).ok_or_else(|| {
        let known: Vec<&str> = p.classes().iter().map(|c| c.name()).collect();
        format!(
            "no client class `{}` in {} (classes: {})",
            a.client,
            a.file.display(),
            known.join(", ")
        )
    })?;
    let m = match catalog.resolve(&a.method).map_err(|e| e.to_string())? {
        Some(ms) if ms.len() == 1 && !a.method.ends_with(".*") => ms[0],
        _ => {
            return Err(format!(
                "`{}`: name one method, as Interface.method",
                a.method
            ))
        }
    };
    let name = catalog.name_of(m);
    match class.decide(m) {
        capgate::Decision::Allowed(rule, at) => println!(
            "allowed: {} ({name}) for client \"{}\": rule \"{rule}\" at {at}",
            a.method,
            class.name()
        ),
        capgate::Decision::Denied => println!(
            "denied: {} ({name}) is not allowed for client \"{}\": no entry of its allowlist [{}] covers it",
            a.method,
            class.name(),
            class.rules().iter().map(|r| format!("\"{}\"", r.pattern)).collect::<Vec<_>>().join(", ")
        ),
    }
    for &i in class.method_quotas_of(m) {
        let r = &class.method_quotas()[usize::from(i)];
        println!(
            "  method rule \"{}\" at {}: {}",
            r.pattern,
            r.location,
            method_quota_text(r)
        );
    }
    if !class.method_quotas_of(m).is_empty() {
        let q = class.quotas();
        println!(
            "  on top of the class's calls_per_second = {}, burst = {}, max_inflight_calls = {}",
            q.calls_per_second, q.burst, q.max_inflight_calls
        );
    }
    Ok(())
}

fn audit(a: &AuditArgs) -> Result<ExitCode, String> {
    let catalog = &a.schema.catalog()?;
    let policy = load(&a.file, catalog)?;
    let bootstrap = catalog
        .interface(&a.bootstrap)
        .map_err(|e| format!("--bootstrap: {e}"))?;
    let report = capgate::audit(&policy, catalog, bootstrap);
    let text = if a.json {
        let mut json = serde_json::to_string_pretty(&report)
            .map_err(|e| format!("writing the report as JSON: {e}"))?;
        json.push('\n');
        json
    } else {
        report.to_string()
    };
    // Not `print!`: it panics when stdout is closed early (`| head`).
    std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())
        .map_err(|e| format!("writing the report: {e}"))?;
    Ok(match report.warnings {
        0 => ExitCode::SUCCESS,
        _ => ExitCode::from(AUDIT_WARNINGS),
    })
}

/// `calls_per_second = 5, burst = 5, max_inflight_calls = 2` (what the rule sets).
fn method_quota_text(r: &capgate::MethodQuota) -> String {
    let mut parts = Vec::new();
    if let Some(rate) = r.rate {
        parts.push(format!(
            "calls_per_second = {}, burst = {}",
            rate.calls_per_second, rate.burst
        ));
    }
    if let Some(n) = r.max_inflight_calls {
        parts.push(format!("max_inflight_calls = {n}"));
    }
    parts.join(", ")
}

fn load(file: &std::path::Path, catalog: &Catalog) -> Result<Policy, String> {
    Policy::load(file, catalog).map_err(|errors| {
        // One `FILE:LINE:COL: message` per line, as compilers print them.
        eprintln!("{errors}");
        let n = errors.0.len();
        format!(
            "{n} error{} in {}",
            if n == 1 { "" } else { "s" },
            file.display()
        )
    })
}
