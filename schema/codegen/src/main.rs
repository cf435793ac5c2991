//! Regenerates what is compiled from the `.capnp` files with the `capnp` compiler: the Rust
//! code for each of capgate's schema files (`schema/src/generated/*_capnp.rs`), their raw
//! `CodeGeneratorRequest` (`schema/src/generated/schema.cgr`, from which `Catalog::builtin`
//! is read, exactly as a user's catalog is), and the requests of the test fixtures
//! (`schema/fixtures/*.cgr`). Run through `scripts/regenerate-schema`, which also formats
//! the output.

use std::path::Path;

const FILES: [&str; 2] = ["store.capnp", "bench.capnp"];
const FIXTURES: [&str; 3] = [
    "fixtures/vault.capnp",
    "fixtures/other.capnp",
    "fixtures/audit.capnp",
];

fn main() {
    if let Err(e) = run() {
        eprintln!("capgate-schema-codegen: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Relative paths: the requests record file names as given, and must not depend on where
    // the repository is checked out.
    std::env::set_current_dir(&root)?;
    let mut cmd = capnpc::CompilerCommand::new();
    cmd.output_path("src/generated")
        .raw_code_generator_request_path("src/generated/schema.cgr");
    for file in FILES {
        cmd.file(file);
    }
    cmd.run()?;
    for fixture in FIXTURES {
        let out = Path::new(fixture).with_extension("cgr");
        let scratch = std::env::temp_dir().join(format!("capgate-fixture-{}", std::process::id()));
        std::fs::create_dir_all(&scratch)?;
        capnpc::CompilerCommand::new()
            .src_prefix("fixtures")
            .file(fixture)
            .output_path(&scratch)
            .raw_code_generator_request_path(&out)
            .run()?;
        let _ = std::fs::remove_dir_all(&scratch);
    }
    let _ = std::fs::remove_file("src/generated/catalog.rs");
    Ok(())
}
