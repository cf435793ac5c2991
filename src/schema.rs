//! `--schema`: a user's schema for `policy check`/`explain` (and the gateway), given as
//! `.capnp` text or as a compiled `CodeGeneratorRequest` (`capnp compile -o- app.capnp`).
//! Text is compiled in-process by the real capnp compiler, embedded as WebAssembly
//! (capnpc-embedded, the default `embedded-compiler` feature), so it works on a machine
//! without capnp installed; without the feature, by the `capnp` program on PATH.

use std::path::{Path, PathBuf};

use capgate_schema::{Catalog, MAX_REQUEST_BYTES};

/// The catalog of these schema files (imports resolved relative to each file, then
/// through `import_paths`; the standard `/capnp/*.capnp` imports are built in).
pub fn load(files: &[PathBuf], import_paths: &[PathBuf]) -> Result<Catalog, String> {
    let mut requests = Vec::with_capacity(files.len());
    for file in files {
        requests.push(request(file, import_paths)?);
    }
    let refs: Vec<&[u8]> = requests.iter().map(Vec::as_slice).collect();
    Catalog::from_requests(&refs).map_err(|e| match files {
        [one] => format!("{}: {e}", one.display()),
        _ => e.to_string(),
    })
}

/// One file's code generator request: read as is, or compiled from text.
fn request(file: &Path, import_paths: &[PathBuf]) -> Result<Vec<u8>, String> {
    let shown = file.display();
    let meta = std::fs::metadata(file).map_err(|e| format!("{shown}: cannot read: {e}"))?;
    if meta.len() > MAX_REQUEST_BYTES as u64 {
        return Err(format!(
            "{shown}: {} bytes exceed the limit of {MAX_REQUEST_BYTES} bytes for a schema",
            meta.len()
        ));
    }
    if file.extension().is_some_and(|e| e == "capnp") {
        compile(file, import_paths)
    } else {
        std::fs::read(file).map_err(|e| format!("{shown}: cannot read: {e}"))
    }
}

#[cfg(feature = "embedded-compiler")]
fn compile(file: &Path, import_paths: &[PathBuf]) -> Result<Vec<u8>, String> {
    let mut cmd = capnpc_embedded::CompileCommand::new();
    cmd.file(file);
    // Display names, and so `file.capnp:Name` in policies, are the file's own name.
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        cmd.src_prefix(dir);
    }
    for dir in import_paths {
        cmd.import_path(dir);
    }
    cmd.compile()
        .map_err(|e| format!("{}: the schema does not compile: {e}", file.display()))
}

#[cfg(not(feature = "embedded-compiler"))]
fn compile(file: &Path, import_paths: &[PathBuf]) -> Result<Vec<u8>, String> {
    let mut cmd = std::process::Command::new("capnp");
    cmd.args(["compile", "-o-"]);
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        cmd.arg(format!("--src-prefix={}", dir.display()));
    }
    for dir in import_paths {
        cmd.arg(format!("--import-path={}", dir.display()));
    }
    let out = cmd.arg(file).output().map_err(|e| {
        format!(
            "{}: cannot run `capnp` to compile it ({e}): install Cap'n Proto, give a compiled \
             request (`capnp compile -o- app.capnp > app.cgr`), or build capgate with the \
             embedded-compiler feature",
            file.display()
        )
    })?;
    if !out.status.success() {
        return Err(format!(
            "{}: the schema does not compile: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}
