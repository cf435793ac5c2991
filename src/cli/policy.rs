use std::path::PathBuf;

use clap::{Args, Subcommand};

use capgate::{Catalog, Policy};

#[derive(Subcommand)]
pub(crate) enum PolicyCommand {
    /// Validate a policy file; print every error as FILE:LINE:COL: message.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// Say whether a client class may call a method, and which rule decides.
    Explain(ExplainArgs),
}

#[derive(Args)]
pub(crate) struct ExplainArgs {
    /// The policy file.
    file: PathBuf,
    /// The client class.
    #[arg(long)]
    client: String,
    /// The method, as `Interface.method` (e.g. Namespace.put).
    method: String,
}

pub(crate) fn run(cmd: PolicyCommand) -> Result<(), String> {
    let catalog = Catalog::builtin();
    match cmd {
        PolicyCommand::Check { file } => {
            let p = load(&file, catalog)?;
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
        PolicyCommand::Explain(a) => {
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
            let (iface, method) = a
                .method
                .split_once('.')
                .ok_or_else(|| format!("`{}`: write the method as Interface.method", a.method))?;
            let m = catalog.method(iface, method).map_err(|e| e.to_string())?;
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
            Ok(())
        }
    }
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
